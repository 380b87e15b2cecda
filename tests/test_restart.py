"""Restarts lose nothing: SIGTERM under load, a restart on a socket systemd holds, and a rolling
restart on a shared port (SO_REUSEPORT), each against the real `hookd` command.

The clients speak raw HTTP/1.1, so the moment each request was wholly written is known: every
request written before hookd was signalled must get a well-formed answer, whatever hookd was
doing with its connection at the time (in the accept queue, idle between two requests, halfway
through a body), and hookd must exit once those answers are written, not at the drain time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests import report
from tests.hookd_process import Hookd, free_port

REPO = Path(__file__).resolve().parent.parent
CALL = orjson.loads((REPO / "examples" / "hook-call.json").read_bytes())
ANSWERS = ("allow", "modify")
CLIENTS = 8
RUNS = 20
LOAD_S = 1.0
AFTER_S = 0.5
DRAIN_S = 20.0
# Far below the drain time, far above what answering a handful of small requests takes: a
# hookd that waits for the drain time (or for idle connections) fails it by seconds.
EXIT_BOUND_S = 10.0
ANSWER_TIMEOUT_S = 60.0
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def request(number: int, session: str = "restart") -> bytes:
    """A hook call new to hookd (its own session), so a worker compresses it."""
    call = {**CALL, "metadata": {**CALL["metadata"], "session_id": f"{session}-{number}"}}
    body = orjson.dumps(call)
    head = f"POST / HTTP/1.1\r\nHost: hookd\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@dataclass
class Exchange:
    written_at: float  # monotonic time by which the whole request was in the kernel
    answer: str  # the answer's action, or what went wrong instead


async def written(writer: asyncio.StreamWriter, data: bytes) -> float:
    writer.write(data)
    while writer.transport.get_write_buffer_size() and not writer.is_closing():
        await asyncio.sleep(0.001)
    return time.monotonic()


async def answer(reader: asyncio.StreamReader, written_at: float) -> tuple[Exchange, bool]:
    """The exchange, and whether the connection may carry another request."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
    except (OSError, EOFError, TimeoutError, asyncio.LimitOverrunError) as exc:
        return Exchange(written_at, type(exc).__name__), False
    status = head.split(b" ", 2)[1]
    action = orjson.loads(body).get("action", "?") if status == b"200" else f"HTTP {status.decode()}"
    return Exchange(written_at, action), b"connection: close" not in head.lower()


async def send(connection: Connection, number: int) -> tuple[Exchange, bool]:
    reader, writer = connection
    return await answer(reader, await written(writer, request(number)))


class Load:
    """Clients sending hook calls back to back until stopped, half of them on keep-alive
    connections and half on a new connection each time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.exchanges: list[Exchange] = []
        self.numbers = itertools.count()
        self.stopping = asyncio.Event()
        self.tasks = [asyncio.create_task(self.client(keep_alive=n % 2 == 0)) for n in range(CLIENTS)]

    async def connect(self) -> Connection:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def client(self, keep_alive: bool) -> None:
        connection: Connection | None = None
        while not self.stopping.is_set():
            if connection is None:
                try:
                    connection = await self.connect()
                except OSError:
                    # Refused: nothing was written, so nothing is lost; try again.
                    await asyncio.sleep(0.05)
                    continue
            exchange, reusable = await send(connection, next(self.numbers))
            self.exchanges.append(exchange)
            if not (keep_alive and reusable):
                connection[1].close()
                connection = None
        if connection is not None:
            connection[1].close()

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    def unanswered(self, before: float = math.inf) -> list[Exchange]:
        return [e for e in self.exchanges if e.written_at < before and e.answer not in ANSWERS]

    def count(self, before: float = math.inf) -> int:
        return sum(e.written_at < before for e in self.exchanges)


def exited_after(server: Hookd, signalled_at: float) -> float:
    server.proc.wait(DRAIN_S + 30)
    return time.monotonic() - signalled_at


async def sigterm_under_load(server: Hookd) -> tuple[Load, list[Exchange], list[Exchange], float]:
    """Load, then a burst written just before SIGTERM on every kind of connection a request can
    be on at that moment; returns the load, the burst, the split requests and when the signal
    went."""
    load = Load(server.port)
    await asyncio.sleep(LOAD_S)
    fresh = [await load.connect() for _ in range(CLIENTS // 2)]
    idle = [await load.connect() for _ in range(CLIENTS // 2)]
    split = [await load.connect() for _ in range(2)]
    for connection in idle:
        exchange, _ = await send(connection, next(load.numbers))
        load.exchanges.append(exchange)
    await asyncio.sleep(0.1)
    burst = [await written(writer, request(next(load.numbers))) for _, writer in fresh + idle]
    halves = [request(next(load.numbers)) for _ in split]
    for (_, writer), data in zip(split, halves, strict=True):
        await written(writer, data[: len(data) // 2])
    signalled_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.05)
    finished = [await written(writer, data[len(data) // 2 :]) for (_, writer), data in zip(split, halves, strict=True)]
    answers = await asyncio.gather(
        *(answer(r, at) for (r, _), at in zip(fresh + idle + split, burst + finished, strict=True))
    )
    await asyncio.sleep(AFTER_S)
    await load.stop()
    for _, writer in fresh + idle + split:
        writer.close()
    exchanges = [exchange for exchange, _ in answers]
    return load, exchanges[: len(burst)], exchanges[len(burst) :], signalled_at


@dataclass
class Run:
    before_signal: int  # requests written before SIGTERM, the burst's included
    unanswered: list[Exchange]  # of those, and of the split ones
    exit_code: int | None
    exited_in: float


def sigterm_run(server: Hookd) -> Run:
    server.wait_ready()
    load, burst, split, signalled_at = asyncio.run(sigterm_under_load(server))
    exited_in = exited_after(server, signalled_at)
    unanswered = load.unanswered(before=signalled_at) + [e for e in burst + split if e.answer not in ANSWERS]
    return Run(load.count(before=signalled_at) + len(burst), unanswered, server.proc.returncode, exited_in)


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_sent_before_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def start(number: int) -> Hookd:
        return Hookd("--drain-timeout", str(DRAIN_S), state_dir=tmp_path / str(number), pool_size=1)

    runs: list[Run] = []
    # The next hookd warms up while this one is tested: half the wall time, and a busy machine.
    upcoming: Hookd | None = start(0)
    try:
        for number in range(RUNS):
            assert upcoming is not None
            server, upcoming = upcoming, start(number + 1) if number + 1 < RUNS else None
            try:
                runs.append(sigterm_run(server))
            finally:
                server.stop()
    finally:
        if upcoming is not None:
            upcoming.stop()
    report.record(
        request,
        runs=RUNS,
        clients=CLIENTS,
        requests_before_signal=sum(r.before_signal for r in runs),
        unanswered=sum(len(r.unanswered) for r in runs),
        drain_timeout_s=DRAIN_S,
        exit_after_signal_s=[round(r.exited_in, 2) for r in runs],
    )
    assert all(r.before_signal > CLIENTS for r in runs), "the clients hardly sent anything"
    # Written before the signal, or begun before it and finished after: answered all the same.
    assert [r.unanswered for r in runs] == [[]] * RUNS
    assert [r.exit_code for r in runs] == [0] * RUNS
    assert [r for r in runs if r.exited_in >= EXIT_BOUND_S] == []


# Puts the socket the test holds where sd_listen_fds looks (fd 3), says it is this process's, as
# systemd would, and becomes hookd.
ACTIVATE = """
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="hookd.socket")
os.execv(sys.executable, [sys.executable, "-m", "hookd", *sys.argv[1:]])
"""


@pytest.fixture
def held_socket() -> Iterator[socket.socket]:
    """A listening socket this test holds across hookd's restarts, as systemd holds hookd.socket."""
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as sock:
        yield sock


def test_a_socket_from_systemd_off_loopback_needs_a_token(tmp_path: Path) -> None:
    with socket.create_server(("0.0.0.0", 0)) as exposed:
        refused = activated(exposed, tmp_path / "refused")
        assert refused.proc.wait(60) == 2
        refused.stop()
        assert "without --token-file" in "".join(refused.stderr)
        with activated(exposed, tmp_path / "allowed", "--allow-unauthenticated") as allowed:
            assert "socket from systemd" in allowed.wait_log("listening on")


def test_sockets_passed_to_another_process_are_not_taken(tmp_path: Path) -> None:
    """LISTEN_FDS meant for a parent (LISTEN_PID is not ours): hookd opens its own socket."""
    with Hookd(state_dir=tmp_path, pool_size=1, env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}) as server:
        assert "(own socket, SO_REUSEPORT)" in server.wait_log("listening on")


def activated(sock: socket.socket, state: Path, *flags: str) -> Hookd:
    fd = sock.fileno()
    return Hookd(
        *flags,
        state_dir=state,
        pool_size=1,
        port=sock.getsockname()[1],
        launcher=("-c", ACTIVATE),
        pass_fds=(fd,),
        env={"TEST_LISTEN_FD": str(fd)},
    )


@dataclass
class Handover:
    load: Load
    signalled_at: float
    exited_in: float  # from SIGTERM to the first hookd's exit

    def assert_nothing_lost(self) -> None:
        before = self.load.count(before=self.signalled_at)
        assert before > CLIENTS and self.load.count() > before, "the clients hardly sent anything"
        assert self.load.unanswered() == []
        assert self.exited_in < EXIT_BOUND_S


def hand_over(servers: list[Hookd], successor: Callable[[], Hookd], overlap: bool) -> Handover:
    """Clients load servers[0] while its successor (appended to servers) takes over: started and
    listening before the first is signalled (overlap: a rolling restart), or started once the
    first has exited (as systemctl restart does). The load goes on while the successor serves."""
    first = servers[0]

    async def run() -> Handover:
        await asyncio.to_thread(first.wait_ready)
        load = Load(first.port)
        await asyncio.sleep(LOAD_S)
        if overlap:
            servers.append(successor())
            await asyncio.to_thread(servers[1].wait_log, "listening on")
            await asyncio.sleep(LOAD_S)
        signalled_at = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        exited_in = await asyncio.to_thread(exited_after, first, signalled_at)
        if not overlap:
            servers.append(successor())
            await asyncio.to_thread(servers[1].wait_ready)
        await asyncio.sleep(LOAD_S)
        await load.stop()
        return Handover(load, signalled_at, exited_in)

    try:
        return asyncio.run(run())
    finally:
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_restart_on_systemds_socket_loses_nothing(tmp_path: Path, held_socket: socket.socket) -> None:
    servers = [activated(held_socket, tmp_path / "state")]
    handover = hand_over(servers, lambda: activated(held_socket, tmp_path / "state"), overlap=False)
    # Before, during and after the restart: the socket never closed, so every request waited
    # for a hookd and got its answer.
    handover.assert_nothing_lost()
    for server in servers:
        assert "(socket from systemd; --listen not used)" in server.wait_log("listening on")
    assert len(servers[1].stdout) > 0, "the second hookd answered nothing"


@pytest.mark.slow
def test_rolling_restart_on_a_shared_port_loses_nothing(tmp_path: Path) -> None:
    servers = [Hookd(state_dir=tmp_path / "first", pool_size=1)]
    port = servers[0].port
    hand_over(
        servers, lambda: Hookd(state_dir=tmp_path / "second", pool_size=1, port=port), overlap=True
    ).assert_nothing_lost()
    first, second = servers
    # The second hookd took its share of the port only once its workers were warm, so no
    # request waited on it for a worker still starting.
    log = "".join(second.stderr)
    assert "already served by another process" in log
    assert log.index("all 1 workers warm") < log.index("listening on")
    assert len(first.stdout) > 0 and len(second.stdout) > 0


SYSTEMD_REASON = "systemctl restart needs systemd as PID 1 (no /run/systemd/system here)"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/run/systemd/system").is_dir(), reason=SYSTEMD_REASON)
def test_systemctl_restart_loses_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("systemd-run") is None:
        pytest.skip("needs root and systemd-run to start a socket and a service unit")
    port = free_port()
    unit = f"hookd-test-{port}"
    command = [sys.executable, "-m", "hookd", "-v", "--pool-size", "1", "--state-dir", str(tmp_path / "state")]
    properties = [f"--socket-property=ListenStream=127.0.0.1:{port}", "--socket-property=Backlog=1024"]
    properties += ["--property=Type=notify", "--property=NotifyAccess=main", "--property=KillMode=mixed"]
    subprocess.run(
        ["systemd-run", f"--unit={unit}", *properties, f"--property=WorkingDirectory={REPO}", *command], check=True
    )

    def systemctl(*args: str) -> None:
        subprocess.run(["systemctl", *args], check=True, timeout=240)

    def ready() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("the socket-activated hookd never became ready")

    async def restart() -> tuple[Load, float]:
        await asyncio.to_thread(ready)
        load = Load(port)
        await asyncio.sleep(LOAD_S)
        restarted_at = time.monotonic()
        await asyncio.to_thread(systemctl, "restart", f"{unit}.service")
        await asyncio.sleep(LOAD_S)
        await load.stop()
        return load, restarted_at

    try:
        load, restarted_at = asyncio.run(restart())
    finally:
        subprocess.run(["systemctl", "stop", f"{unit}.socket", f"{unit}.service"], check=False)
    assert load.count(before=restarted_at) > CLIENTS and load.count() > load.count(before=restarted_at)
    assert load.unanswered() == []
