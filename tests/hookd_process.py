"""Run the real `hookd` command as a child process, for integration tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Hookd:
    """`hookd` on a free loopback port; stdout (-v lines) and stderr are collected in memory."""

    def __init__(
        self,
        *flags: str,
        state_dir: Path,
        env: dict[str, str] | None = None,
        pool_size: int = 2,
        port: int | None = None,
        launcher: Sequence[str] = ("-m", "hookd"),
        pass_fds: Sequence[int] = (),
    ) -> None:
        """`port` shares a port another hookd (or a test's own socket) holds; `launcher` replaces
        `-m hookd` (a `-c` script that execs hookd, say), and `pass_fds` stay open in it."""
        self.state_dir = state_dir
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}/"
        args = [sys.executable, *launcher, "-v", "--listen", f"127.0.0.1:{self.port}"]
        args += ["--pool-size", str(pool_size), "--state-dir", str(state_dir), *flags]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
            pass_fds=pass_fds,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=_collect, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=_collect, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=5) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read())

    def wait_ready(self, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hookd exited with {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
            try:
                status, body = self.get("/readyz")
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"hookd not ready after {timeout} s: {''.join(self.stderr)[-2000:]}")

    def line(self, index: int, timeout: float = 10.0) -> str:
        """The index-th -v line, waiting for it: the reader thread may lag the HTTP answer."""
        deadline = time.monotonic() + timeout
        while len(self.stdout) <= index:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no -v line {index} after {timeout} s (have {len(self.stdout)})")
            time.sleep(0.01)
        return self.stdout[index]

    def wait_log(self, text: str, timeout: float = 180.0) -> str:
        """The first stderr line holding `text`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(self.stderr) if text in line), None)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"hookd exited with {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {text!r} on hookd's stderr after {timeout} s: {''.join(self.stderr)[-2000:]}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.get("/readyz")[1]["workers"] if "pid" in w]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        return self.proc.returncode

    def __enter__(self) -> Hookd:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _collect(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)
