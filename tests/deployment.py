"""hookd deployed as an operator runs N replicas, for integration tests and benchmarks: one
`redis-server` from `examples/redis.conf`, hookd replicas sharing it, and `haproxy` from
`examples/haproxy.cfg` in round robin in front of them, all on loopback ports of their own.

The example files are used as they are, with only ports, passwords and the server list changed,
so the tests also show that what the README tells an operator to start from works.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.corpus import REPO
from tests.hookd_process import Hookd, free_port

EXAMPLES = REPO / "examples"
HOOKD_PASSWORD = "hookd-test-password"
ADMIN_PASSWORD = "admin-test-password"
READY_TIMEOUT_S = 180.0
REPLICA_HEADER = "X-Hookd-Replica"


def missing() -> str | None:
    """Why a deployment cannot run on this machine, or None."""
    absent = [tool for tool in ("redis-server", "redis-cli", "haproxy") if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (Debian packages redis-server, haproxy; scripts/test installs them)"
    return None


def wait_for(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout} s")


def terminate(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Redis:
    """redis-server from the example configuration, with an `admin` user for the test's own looks."""

    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.start()

    def start(self) -> None:
        config = (EXAMPLES / "redis.conf").read_text()
        config = config.replace(">change-me-to-a-long-random-password", f">{HOOKD_PASSWORD}")
        config += f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
        path = self.home / "redis.conf"
        path.write_text(config)
        command = ["redis-server", str(path), "--port", str(self.port), "--dir", str(self.home)]
        command += ["--enable-debug-command", "local", *self.extra]
        self.log = open(self.home / "redis.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.cli("PING", check=False).stdout.strip() == "PONG", "redis-server not answering", 30)

    @property
    def url(self) -> str:
        return f"redis://hookd@127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> list[str]:
        """`redis-cli` as the admin user, running `args`."""
        return [
            "redis-cli",
            "-p",
            str(self.port),
            "--user",
            "admin",
            "--pass",
            ADMIN_PASSWORD,
            "--no-auth-warning",
            *args,
        ]

    def cli(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), capture_output=True, text=True, check=check, timeout=timeout)

    def monitor(self, into: Path) -> subprocess.Popen[bytes]:
        """`MONITOR` written to a file until the process is stopped."""
        with open(into, "wb") as out:
            proc = subprocess.Popen(self.command("MONITOR"), stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: into.stat().st_size > 0, "MONITOR did not start", 10)
        return proc

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # A paused Redis must go on to hear the request to stop.
            self.proc.send_signal(signal.SIGCONT)
            terminate(self.proc)
        if self.log is not None:
            self.log.close()


class Haproxy:
    """haproxy from the example configuration, bound to a free port, in front of `backends`."""

    def __init__(self, home: Path, backends: list[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        config = (EXAMPLES / "haproxy.cfg").read_text()
        config = config.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{self.port}")
        servers = "".join(f"    server hookd{i + 1} 127.0.0.1:{port}\n" for i, port in enumerate(backends))
        config = re.sub(r"(    server .*\n)+", servers, config)
        path = home / "haproxy.cfg"
        path.write_text(config)
        self.log = open(home / "haproxy.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=self.log, stderr=subprocess.STDOUT)

    def replica(self) -> str | None:
        """The replica a request to /healthz went to."""
        try:
            with urllib.request.urlopen(self.url + "healthz", timeout=5) as response:
                return response.headers.get(REPLICA_HEADER)
        except (OSError, urllib.error.URLError):
            return None

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()


class Deployment:
    """Redis, `count` hookd replicas sharing it, and haproxy in front; `url` is haproxy's."""

    def __init__(self, home: Path, count: int = 2, pool_size: int = 1, flags: tuple[str, ...] = ()) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.flags = flags
        self.pool_size = pool_size
        self.key_file = home / "state.key"
        self.key_file.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        self.password_file = home / "state.password"
        self.password_file.write_text(HOOKD_PASSWORD + "\n")
        self.redis = Redis(home / "redis")
        self.replicas: dict[str, Hookd] = {}
        self.haproxy: Haproxy | None = None
        try:
            for index in range(count):
                self.replicas[f"hookd{index + 1}"] = self._hookd(index)
            for hookd in self.replicas.values():
                hookd.wait_ready(READY_TIMEOUT_S)
            self.haproxy = Haproxy(home, [h.port for h in self.replicas.values()])
            self.wait_all_up()
        except BaseException:
            self.stop()
            raise
        self.url = self.haproxy.url

    def _hookd(self, index: int, port: int | None = None) -> Hookd:
        state = ("--state-url", self.redis.url, "--state-key-file", str(self.key_file))
        state += ("--state-password-file", str(self.password_file))
        return Hookd(
            *state, *self.flags, state_dir=self.home / f"hookd{index + 1}", pool_size=self.pool_size, port=port
        )

    def wait_all_up(self, timeout: float = 60) -> None:
        """Until haproxy has sent requests to every replica (its health checks passed)."""
        assert self.haproxy is not None
        seen: set[str | None] = set()

        def every_replica_answers() -> bool:
            seen.add(self.haproxy.replica() if self.haproxy else None)
            return set(self.replicas) <= seen

        wait_for(every_replica_answers, "haproxy has not used every replica", timeout)

    def kill(self, name: str) -> None:
        self.replicas[name].proc.kill()
        self.replicas[name].stop()

    def restart(self, name: str) -> None:
        """The replica started again on its port, and back in haproxy's rotation."""
        old = self.replicas[name]
        old.stop()
        index = list(self.replicas).index(name)
        self.replicas[name] = self._hookd(index, port=old.port)
        self.replicas[name].wait_ready(READY_TIMEOUT_S)
        self.wait_all_up()

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for hookd in self.replicas.values():
            hookd.stop()
        self.redis.stop()
