"""Process accounting for contenders: CPU time and peak resident memory of whole process trees.

A contender is a root process plus whatever it spawns (hookd's workers, uvicorn's children), so
every figure sums the tree as it is at the moment of measuring. RSS is summed per process, which
counts pages two processes share twice; the figure is an upper bound, the same way for everyone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import psutil

SAMPLE_INTERVAL_S = 0.2


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    total = 0.0
    for process in tree(pid):
        # A worker may exit between listing and reading; it simply no longer counts.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += measure(process)
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the tree's live processes."""
    return _sum(pid, lambda p: sum(p.cpu_times()[:2]))


def rss_bytes(pid: int) -> float:
    return _sum(pid, lambda p: p.memory_info().rss)


class PeakRss:
    """Samples the RSS of registered trees in a thread and keeps each one's peak."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self._roots: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._roots[name] = pid

    def forget(self, name: str) -> None:
        self.sample_one(name)
        with self._lock:
            self._roots.pop(name, None)

    def sample_one(self, name: str) -> None:
        with self._lock:
            pid = self._roots.get(name)
        if pid is not None:
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss_bytes(pid))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            with self._lock:
                names = list(self._roots)
            for name in names:
                self.sample_one(name)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
