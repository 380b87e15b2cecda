"""Work that can wait, done while no hook call is in progress.

Counting a provider's usage event costs the front end about a millisecond of CPU, the same
event loop and CPUs a hook call needs. Nobody waits for that count, and someone always waits for
a hook call: so the count waits, in a bounded queue, until no hook call is in progress, or at
most `max_delay` seconds, then runs one piece at a time with the loop free in between. Past
`max_bytes` queued the work is done at once, as if nothing were deferred: a flood costs hook
latency, never memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger("hookd.deferred")
Work = Callable[[], Awaitable[None]]


class Quiet:
    """How many hook calls are in progress, and a way to wait until none is."""

    def __init__(self) -> None:
        self.calls = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self.calls += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self.calls -= 1
            if self.calls == 0:
                self._quiet.set()

    def quiet(self) -> bool:
        return self.calls == 0

    async def wait(self, seconds: float) -> None:
        """Until no call is in progress, or `seconds` have passed, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._quiet.wait()


@dataclass
class _Item:
    size: int
    due: float
    work: Work


class Deferred:
    def __init__(self, quiet: Quiet, max_bytes: int, max_delay: float) -> None:
        self.quiet = quiet
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.items: deque[_Item] = deque()
        self.bytes = 0
        self._waiting = asyncio.Event()

    async def submit(self, size: int, work: Work) -> None:
        """Run `work` now if nothing is waiting and no hook call is in progress, or if the queue
        is full; else queue it."""
        if (self.quiet.quiet() and not self.items) or self.bytes + size > self.max_bytes:
            await _run(work)
            return
        self.items.append(_Item(size, time.monotonic() + self.max_delay, work))
        self.bytes += size
        self._waiting.set()

    async def run(self) -> None:
        """The queue's runner, for as long as the server runs."""
        while True:
            await self._waiting.wait()
            # Checked again after each wake: a hook call may have begun since the last one ended.
            while not self.quiet.quiet() and (left := self.items[0].due - time.monotonic()) > 0:
                await self.quiet.wait(left)
            await self._next()
            # One piece of work at a time: a hook call that arrives meanwhile is read next.
            await asyncio.sleep(0)

    async def finish(self) -> None:
        """Everything still queued, at shutdown: a restart loses no count."""
        while self.items:
            await self._next()

    async def _next(self) -> None:
        item = self.items.popleft()
        self.bytes -= item.size
        if not self.items:
            self._waiting.clear()
        await _run(item.work)


async def _run(work: Work) -> None:
    try:
        await work()
    except Exception as exc:
        # The work's own errors are its to count; this keeps the queue's runner alive for a bug,
        # named by its type alone: an exception's text can carry what the work was reading.
        log.error("deferred work failed: %s", type(exc).__name__)
