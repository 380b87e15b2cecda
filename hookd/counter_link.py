"""The front end's side of the events process (`hookd.counter`): start it and keep it running, pass
it what the hook did to each request, and ask it for its series when /metrics is scraped.

Nothing here may hold up or fail a hook call. A note is a few hundred bytes written without
waiting; while the process is down, starting or more than `MAX_BUFFERED` behind, notes are dropped
and counted (their events then count as unmatched). A scrape waits at most `PAGE_TIMEOUT_S` for the
process's series and shows the front end's own without them. A process that misses
`HUNG_AFTER_PAGES` scrapes in a row is taken for hung, killed and started again, as a worker past
--max-compress is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
import time
from multiprocessing.process import BaseProcess
from typing import Any

from hookd import counter
from hookd.config import Store
from hookd.ledger import Facts, as_wire
from hookd.metrics import Metrics
from hookd.settings import Settings
from worker import frames

log = logging.getLogger("hookd")
SPAWN = multiprocessing.get_context("spawn")
MAX_BUFFERED = 4 * 1024 * 1024
PAGE_TIMEOUT_S = 2.0
HUNG_AFTER_PAGES = 3
START_TIMEOUT_S = 30.0
# On the way out, the process answers and counts the events it has read (`hookd.runner`'s
# margin), then exits; one that takes longer than this is killed.
STOP_GRACE_S = 5.0
# As for workers: a process that lived this long was healthy, and its exit starts the backoff over.
STABLE_AFTER_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class CounterLink:
    def __init__(self, settings: Settings, listening: socket.socket, store: Store, metrics: Metrics) -> None:
        """`listening`: the events listener, bound and listening; it stays open across restarts
        of the process, so events wait in its queue instead of being refused."""
        self.settings = settings
        self.listening = listening
        self.store = store
        self.metrics = metrics
        self.writer: asyncio.StreamWriter | None = None
        self.process: BaseProcess | None = None
        self.running = False
        self.pages: dict[int, asyncio.Future[bytes]] = {}
        self.asked = 0
        self.missed_pages = 0
        self.sent_prices: object = None
        self.stopping = asyncio.Event()
        self.supervisor: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the process and keeps it running; the hook does not wait for it (events wait
        in the listener's queue until it listens)."""
        self.supervisor = asyncio.create_task(self._supervise())

    def info(self) -> dict[str, Any]:
        """For /readyz: where events are taken, and by which process."""
        host, port = self.listening.getsockname()[:2]
        pid = self.process.pid if self.running and self.process is not None else None
        return {"url": f"http://{_host(host)}:{port}/events", "pid": pid}

    def note(self, request_id: str, facts: Facts) -> None:
        if not request_id:
            return
        if not self.running or not self.send_prices() or not self._send({"note": [request_id, as_wire(facts)]}):
            self.metrics.notes_dropped.inc()

    def send_prices(self) -> bool:
        """The operator's `cache_prices`, if the process does not have them yet; whether it has."""
        overrides = self.store.values["cache_prices"]
        if overrides is self.sent_prices:
            return True
        sent = self._send({"prices": overrides})
        self.sent_prices = overrides if sent else None
        return sent

    async def page(self) -> bytes:
        """The process's series in the exposition format, or nothing if it cannot say in time."""
        self.asked += 1
        asked = self.asked
        waiting = self.pages[asked] = asyncio.get_running_loop().create_future()
        try:
            if not self.running or not self._send({"page": asked}):
                return b""
            page = await asyncio.wait_for(waiting, PAGE_TIMEOUT_S)
        except TimeoutError:
            self._missed_page()
            return b""
        finally:
            self.pages.pop(asked, None)
        self.missed_pages = 0
        return page

    async def stop(self) -> None:
        """Closes the channel: the process answers what it has read, counts it, and exits."""
        self.stopping.set()
        if self.writer is not None:
            self.writer.close()
        if self.supervisor is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.supervisor), STOP_GRACE_S)
        except TimeoutError:
            log.warning("events process: still running %.0f s after it was told to stop; killing it", STOP_GRACE_S)
            self._kill()
            await self.supervisor

    def _send(self, message: dict[str, Any]) -> bool:
        """Writes a frame without waiting; False (and nothing raised) if the channel cannot take it."""
        writer = self.writer
        if writer is None or writer.transport.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            return False
        try:
            writer.write(frames.encode(message))
        except Exception as exc:
            # The channel broke under the write (the process has just gone): its reader ends it.
            log.warning("events process: could not write to it: %s", type(exc).__name__)
            return False
        return True

    def _missed_page(self) -> None:
        self.missed_pages += 1
        log.warning("events process did not send its series within %.0f s", PAGE_TIMEOUT_S)
        if self.missed_pages >= HUNG_AFTER_PAGES:
            log.error("events process: %d scrapes unanswered in a row; taking it for hung", self.missed_pages)
            self._kill()

    def _kill(self) -> None:
        """Kills the process; its supervisor sees the channel close, reaps it and starts another."""
        self.missed_pages = 0
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    async def _supervise(self) -> None:
        crashes = 0
        while not self.stopping.is_set():
            if crashes:
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (crashes - 1))
                log.warning("events process: restarting in %.1f s after %d quick failures", delay, crashes)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                if self.stopping.is_set():
                    return
            started = time.monotonic()
            try:
                await self._run_one()
            except Exception as exc:
                # Whatever went wrong, the next process starts after the backoff: counting
                # usage is worth retrying, and the hook never waits for it.
                log.error("events process: %s: %s", type(exc).__name__, exc)
            finally:
                await self._end()
            lived = time.monotonic() - started
            crashes = 0 if lived >= STABLE_AFTER_S else crashes + 1
            if not self.stopping.is_set():
                self.metrics.events_process_restarts.inc()
                log.warning("events process: exited after %.1f s", lived)

    async def _run_one(self) -> None:
        """One process, from its start until its channel closes."""
        ours, theirs = socket.socketpair()
        process = SPAWN.Process(
            target=counter.run, args=(theirs, self.listening, self.settings), name="hookd-events", daemon=True
        )
        self.process = process
        try:
            # Process.start() forks and pickles; keep that off the event loop.
            await asyncio.to_thread(process.start)
        finally:
            theirs.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=ours)
        hello = await asyncio.wait_for(frames.read(reader), START_TIMEOUT_S)
        if not hello.get("ready"):
            raise frames.FrameError(f"events process said {hello}")
        self.running, self.sent_prices = True, None
        self.send_prices()
        log.info("events process: pid %s taking events on %s", process.pid, self.info()["url"])
        if self.stopping.is_set():
            self.writer.close()  # told to stop while it was starting
        await self._read_pages(reader)

    async def _read_pages(self, reader: asyncio.StreamReader) -> None:
        """Until the process goes, hands each page it sends to the scrape that asked for it."""
        while True:
            try:
                reply = await frames.read(reader)
                waiting = self.pages.get(int(reply.get("page", 0)))
            except (asyncio.IncompleteReadError, OSError, frames.FrameError, TypeError, ValueError):
                return  # gone, or garbled: either way it is ended and started again
            if waiting is not None and not waiting.done():
                waiting.set_result(str(reply.get("text", "")).encode())

    async def _end(self) -> None:
        self.running = False
        for waiting in self.pages.values():
            if not waiting.done():
                waiting.set_result(b"")
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        process = self.process
        if process is None or process.pid is None:
            self.process = None
            return
        await asyncio.to_thread(process.join, STOP_GRACE_S if self.stopping.is_set() else 0.2)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, STOP_GRACE_S)
        self.process = None
        process.close()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
