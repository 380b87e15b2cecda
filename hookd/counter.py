"""The events process: Aperture's `entire_request` events on their own listener (--events-listen),
counted at a lower CPU priority than the hook's.

Every event costs about a millisecond of CPU to receive, parse and count, most of it aiohttp's own;
10,000 a minute is a sixth of a core. In the front end that time is taken from the hook calls
sharing its event loop and its cores, and shows in their slowest answers. Here it runs in a process
of its own, niced (`NICE`), so when hook calls and events want the same CPU the kernel gives it to
the hook calls first.

Started by `hookd.counter_link` through multiprocessing's spawn context with the listening socket
(opened by the front end, so it outlives a restart of this process) and one end of a socket pair,
over which frames (`worker.frames`) come from the front end:
  {"note": [request_id, facts]}  what the hook did to a request (`hookd.ledger.as_wire`)
  {"prices": overrides}          the operator's `cache_prices`, at start and whenever they change
  {"page": n}                    asks for this process's series; answered {"page": n, "text": ...}
It says {"ready": true} once it listens, and exits when the front end closes its end: it stops
listening, answers the events it has read, counts what it holds, and goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from hookd import prices
from hookd.deferred import Quiet
from hookd.events import Events
from hookd.ledger import Ledger, from_wire
from hookd.listener import BACKLOG
from hookd.metrics import ModelLabels, render_yielding
from hookd.runner import make_runner
from hookd.settings import Settings
from worker import frames

log = logging.getLogger("hookd.counter")
# Weight 110 against the hook's 1024 (sched(7)): about a tenth of a contended CPU, all of an idle one.
NICE = 10
READ_CHUNK = 256 * 1024


def run(channel: socket.socket, listening: socket.socket, settings: Settings) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="hookd events: %(message)s")
    try:
        os.nice(NICE)
    except OSError as exc:
        # A seccomp filter without setpriority: events then share the CPU evenly with the hook.
        log.warning("cannot lower this process's priority: %s", exc)
    # Ctrl-C (or a SIGTERM to the process group) reaches this process too, but the front end
    # decides when it stops: after the front end's last answer, whose events it should count.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uvloop.run(serve(channel, listening, settings))


class Counter:
    """The events endpoint with its own ledger, filled by the front end's notes."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.ledger = Ledger()
        self.table = prices.merged({})
        # No hook call runs in this process, so events are counted as they come.
        self.events = Events(settings, self.ledger, lambda: self.table, Quiet(), self.registry, ModelLabels())

    def handle(self, frame: dict[str, Any]) -> int | None:
        """One frame from the front end; for a request for the series, its number."""
        if "note" in frame:
            request_id, facts = frame["note"]
            self.ledger.note(str(request_id), from_wire(facts))
        elif "prices" in frame:
            self.table = prices.merged(frame["prices"])
        elif "page" in frame:
            return int(frame["page"])
        return None


class Channel:
    """The front end's frames, read in the I/O callback as soon as they arrive, to the last byte
    the socket holds, before the handler of any event that came in with them runs. A request is
    noted before it is answered, so its event, sent after the answer, finds its note here (unless
    this process is so far behind that the front end is still holding the note)."""

    def __init__(self, sock: socket.socket, counter: Counter) -> None:
        self.sock = sock
        self.counter = counter
        self.buffer = bytearray()
        self.sending = asyncio.Lock()
        self.replies: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    async def send(self, message: dict[str, Any]) -> None:
        async with self.sending:
            await self.loop.sock_sendall(self.sock, frames.encode(message))

    def _readable(self) -> None:
        gone = False
        while not gone:
            try:
                chunk = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            gone = not chunk
            self.buffer += chunk
        try:
            self._frames()
        except frames.FrameError as exc:
            log.error("the front end's frames are garbled (%s); stopping", exc)
            gone = True
        if gone:
            # The front end has gone (its last frames read) or cannot be understood: stop.
            self._close()

    def _frames(self) -> None:
        while len(self.buffer) >= frames.HEADER.size:
            end = frames.HEADER.size + frames.frame_length(bytes(self.buffer[: frames.HEADER.size]))
            if len(self.buffer) < end:
                return
            frame = frames.loads(self.buffer[frames.HEADER.size : end])
            del self.buffer[:end]
            try:
                asked = self.counter.handle(frame)
            except (TypeError, ValueError, KeyError) as exc:
                # A frame of a shape this process does not know (a front end of another
                # version): that request goes uncounted, the rest are not.
                log.error("ignored a frame from the front end: %s", type(exc).__name__)
                continue
            if asked is not None:
                task = asyncio.create_task(self._reply(asked))
                self.replies.add(task)
                task.add_done_callback(self.replies.discard)

    async def _reply(self, asked: int) -> None:
        text = await render_yielding(self.counter.registry)
        with contextlib.suppress(OSError):
            await self.send({"page": asked, "text": text.decode()})

    def _close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        if not self.closed.done():
            self.closed.set_result(None)


async def serve(channel_sock: socket.socket, listening: socket.socket, settings: Settings) -> None:
    counter = Counter(settings)
    app = web.Application()
    counter.events.routes(app)
    # Events are fire and forget: on the way out, the ones being read get `WRITE_MARGIN_S`.
    runner = await make_runner(app)
    # As in the front end: what start-up built lives as long as the process, and full
    # collections need not scan it again each time parsed events hasten one.
    gc.collect()
    gc.freeze()
    channel = Channel(channel_sock, counter)
    await web.SockSite(runner, listening, backlog=BACKLOG).start()
    await channel.send({"ready": True, "pid": os.getpid()})
    # Until the front end goes: then the events being read are answered and counted.
    await channel.closed
    await runner.cleanup()
    channel_sock.close()
