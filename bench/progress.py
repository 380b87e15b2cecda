"""A one-line progress bar on stderr: no dependency, and silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time

WIDTH = 30


class Progress:
    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        # Logs and CI capture stderr: there a line per phase reads better than carriage returns.
        self.live = sys.stderr.isatty()
        self.label = ""

    def advance(self, units: int = 1, label: str | None = None) -> None:
        self.done = min(self.total, self.done + units)
        if label is not None and label != self.label:
            self.label = label
            if not self.live:
                print(f"bench: {self.line()}", file=sys.stderr, flush=True)
        if self.live:
            print(f"\r{self.line()}", end="", file=sys.stderr, flush=True)

    def line(self) -> str:
        filled = WIDTH * self.done // self.total
        elapsed = time.monotonic() - self.started
        return f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done / self.total:4.0%} {elapsed:5.0f} s  {self.label}"

    def close(self) -> None:
        if self.live:
            print(file=sys.stderr)
