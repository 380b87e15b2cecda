"""Start-up, serving and shutdown: wires settings, listener, pool, handlers and systemd together.

Start-up listens at once (so /healthz answers and /readyz can say "starting"), spawns the
workers, and tells systemd READY=1 only when every worker is warm. A hookd joining a port that
another one still serves (a rolling restart) listens only once its workers are warm.

The first SIGTERM or SIGINT drains: the connections waiting to be accepted are accepted, the
listening socket closes, every request already sent is read and answered (in full, or `allow`
once the drain time is up), each connection is closed as soon as it owes nothing, and hookd
exits 0 as soon as none is left. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

from hookd import auth
from hookd.admin import Admin, ml_summary
from hookd.compressor import Compressor
from hookd.config import Store
from hookd.counter_link import CounterLink
from hookd.events import PATH as EVENTS_PATH
from hookd.events import Events
from hookd.hook import Hook
from hookd.ledger import Ledger
from hookd.listener import BACKLOG, Listener, ListenError, open_listener, own_socket
from hookd.metrics import Metrics
from hookd.runner import WRITE_MARGIN_S, make_runner
from hookd.sdnotify import Notifier
from hookd.settings import Settings
from hookd.shared_state import open_records
from hookd.sticky import Records

log = logging.getLogger("hookd")
EXIT_ON_SECOND_SIGNAL = 130
EXIT_CANNOT_LISTEN = 2
# While draining, a connection is closed once it owes nothing and has been quiet this long: a
# client that has just connected, or just read an answer, may be writing its next request.
QUIET_S = 1.0
SETTLE_TICK_S = 0.05
ADMIN = web.AppKey("admin", Admin)
HOOK = web.AppKey("hook", Hook)


def build_app(
    settings: Settings,
    compressor: Compressor,
    metrics: Metrics,
    store: Store,
    clock: Callable[[], float] = time.time,
    records: Records | None = None,
    counter: CounterLink | None = None,
) -> web.Application:
    """`records`: where conversation records live (this process's memory unless given).
    `counter`: the events process (--events-listen); without it, events come to /events here."""
    app = web.Application(middlewares=[_answer_in_full])
    app.on_response_prepare.append(_last_answer_when_draining)
    admin = Admin(settings, compressor, metrics, store, counter)
    ledger = Ledger()
    hook = Hook(settings, compressor, metrics, store, clock, records, counter or ledger)
    admin.routes(app)
    if counter is None:
        Events(settings, ledger, store.price_table, hook.quiet, metrics.registry, metrics.models).routes(app)
    else:
        app.router.add_route("*", EVENTS_PATH, _Misdirected(settings))
    # The hook answers on every other path: the operator picks the URL in Aperture's config.
    app.router.add_route("*", "/{tail:.*}", hook.hook)
    app[ADMIN], app[HOOK] = admin, hook
    return app


class _Misdirected:
    """An event sent to /events on --listen when events have their own listener: not a hook call,
    so answered like an event (with the hook's token), and said once, so the operator fixes
    Aperture's URL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.said = False

    async def __call__(self, request: web.Request) -> web.Response:
        if not auth.allowed(request, self.settings.hook_token):
            return web.json_response({"error": "missing or wrong hook token"}, status=401)
        if not self.said:
            self.said = True
            log.warning("an event came to %s on --listen; point Aperture's events hook at --events-listen", EVENTS_PATH)
        return web.json_response({"action": "allow"})


async def start_site(app: web.Application, settings: Settings) -> web.AppRunner:
    """The app served on its own socket on settings' address (for tests)."""
    runner = await make_runner(app)
    await Site(runner, Listener([own_socket(settings.host, settings.port)[0]])).start()
    return runner


class Connection(asyncio.Protocol):
    """One client connection: aiohttp's handler for it, and whether the client is owed an answer
    (bytes arrived that no written answer has covered yet), so a drain knows when it may close it."""

    def __init__(self, handler: RequestHandler, registry: set[Connection]) -> None:
        self.handler = handler
        self.registry = registry
        self.transport: asyncio.BaseTransport | None = None
        self.owed = False
        self.loop = asyncio.get_running_loop()
        self.quiet_since = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.registry.add(self)
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.owed = True
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def answered(self) -> None:
        self.owed = False
        self.quiet_since = self.loop.time()

    def idle(self) -> bool:
        """Owes nothing, has been quiet a while, and the kernel holds no unread bytes for it."""
        if self.owed or self.loop.time() - self.quiet_since < QUIET_S or self.transport is None:
            return False
        return _unread(self.transport) == 0

    def close(self) -> None:
        self.handler.force_close()


def _unread(transport: asyncio.BaseTransport) -> int:
    try:
        fd = transport.get_extra_info("socket").fileno()
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0  # already closed: nothing left to read


class Site(web.BaseSite):
    """The app served on a Listener's sockets, every connection tracked until it owes nothing."""

    def __init__(self, runner: web.AppRunner, listener: Listener) -> None:
        super().__init__(runner, backlog=BACKLOG)
        assert runner.server is not None
        self.handlers = runner.server
        self.listener = listener
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.AbstractServer] = []

    @property
    def name(self) -> str:
        return ", ".join(self.listener.urls())

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        for sock in self.listener.sockets:
            # The loop closes the socket it serves the moment it stops serving it, resetting
            # the connections in its queue; serving a duplicate leaves that moment to us.
            server = await loop.create_server(self._connection, sock=sock.dup(), backlog=self._backlog)
            self.servers.append(server)

    async def stop(self) -> None:
        """Stops listening; the connections that were waiting are served like the others."""
        for server in self.servers:
            server.close()
        accepted = self.listener.close()
        loop = asyncio.get_running_loop()
        for sock in accepted:
            await loop.connect_accepted_socket(self._connection, sock)
        if self.servers:
            await super().stop()

    async def settle(self, deadline: float) -> None:
        """Until the deadline, closes each connection as soon as it is idle; returns when none
        is left."""
        loop = asyncio.get_running_loop()
        while self.connections and loop.time() < deadline:
            for connection in [c for c in self.connections if c.idle()]:
                connection.close()
            await asyncio.sleep(SETTLE_TICK_S)

    def _connection(self) -> Connection:
        return Connection(self.handlers(), self.connections)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _answer_in_full(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Writes each answer before its connection counts as owing nothing, so a drain never
    closes a connection under an answer aiohttp has yet to write."""
    try:
        response = await handler(request)
        if not response.prepared:
            # A client that went away is aiohttp's to report, as for any answer.
            with contextlib.suppress(ConnectionError):
                await response.prepare(request)
                await response.write_eof()
        return response
    finally:
        connection = request.transport.get_protocol() if request.transport is not None else None
        if isinstance(connection, Connection):
            connection.answered()


async def _last_answer_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    # Told on an answer, a client sends its next request on a new connection, which goes to
    # the hookd that replaces this one, instead of on one we are about to close.
    if request.app[ADMIN].draining:
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"


async def run(settings: Settings) -> int:
    from hookd.pool import WorkerPool

    try:
        listener = open_listener(settings)
    except (ListenError, OSError) as exc:
        log.error("cannot listen: %s", exc)
        return EXIT_CANNOT_LISTEN
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = Store(settings.state_dir, settings.affinity_wait)
    metrics = Metrics()
    pool = WorkerPool(settings, metrics)
    try:
        counter = _counter(settings, store, metrics)
    except OSError as exc:
        log.error("cannot listen for events: %s", exc)
        return EXIT_CANNOT_LISTEN
    records = await open_records(settings, metrics)
    app = build_app(settings, pool, metrics, store, records=records, counter=counter)
    notifier = Notifier()
    runner = await make_runner(app)
    site = Site(runner, listener)
    if listener.shared:
        log.info("%s is already served by another process; joining it once every worker is warm", site.name)
    else:
        await _listen(site, settings)
    if counter is not None:
        counter.start()
    await pool.start()
    # What start-up built (modules, the app, the tables) lives as long as the process. Frozen, it
    # is left out of full collections, which otherwise scan it at every one: ~45 ms each on a
    # busy two-core host, and every parsed body (an event's stream, a hook call) hastens the next.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    _handle_signals(stop)
    announcing = asyncio.create_task(_announce_ready(pool, notifier, settings, site))
    await stop.wait()
    announcing.cancel()
    await _drain(app, runner, site, pool, notifier, settings)
    if counter is not None:
        await counter.stop()
        counter.listening.close()
    log.info("stopped")
    return 0


def _counter(settings: Settings, store: Store, metrics: Metrics) -> CounterLink | None:
    """The events process's link, its listener open, when events have their own (--events-listen)."""
    if settings.events_listen is None:
        return None
    sock, _ = own_socket(*settings.events_listen)
    sock.listen(BACKLOG)
    return CounterLink(settings, sock, store, metrics)


async def _listen(site: Site, settings: Settings) -> None:
    await site.start()
    log.info("listening on %s (%s) with %d workers", site.name, site.listener.origin(), settings.pool_size)


def _handle_signals(stop: asyncio.Event) -> None:
    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(EXIT_ON_SECOND_SIGNAL)
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def _announce_ready(pool: Compressor, notifier: Notifier, settings: Settings, site: Site) -> None:
    """READY=1 once every worker is warm, then watchdog keep-alives from this event loop: if
    the loop stalls, the keep-alives stop and systemd restarts us."""
    while not await pool.wait_ready(settings.warmup_timeout):
        log.warning("workers are not all warm after %.0f s; still waiting", settings.warmup_timeout)
    log.info("all %d workers warm; %s", settings.pool_size, ml_line(ml_summary(pool.worker_info())))
    if not site.servers:
        await _listen(site, settings)
    notifier.send("READY=1", f"STATUS=serving with {settings.pool_size} warm workers")
    interval = notifier.watchdog_interval()
    while interval:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


def ml_line(summary: dict[str, Any]) -> str:
    if summary["ml_text_compression"]:
        note = f"; {summary['ml_reason']}" if "ml_reason" in summary else ""
        return f"text compression on (Kompress, {summary['ml_provider']}){note}"
    return f"text compression off: {summary.get('ml_reason', 'no worker reported it')}"


async def _drain(
    app: web.Application, runner: web.AppRunner, site: Site, pool: Compressor, notifier: Notifier, settings: Settings
) -> None:
    app[ADMIN].draining = True
    notifier.send("STOPPING=1", "STATUS=draining")
    loop = asyncio.get_running_loop()
    loop.call_later(settings.drain_timeout, app[HOOK].drain_expired.set)
    await site.stop()
    log.info("stopped listening; %d connections to finish", len(site.connections))
    # Each request still in flight is answered by the drain time, and written within the margin.
    await site.settle(loop.time() + settings.drain_timeout + WRITE_MARGIN_S)
    await runner.cleanup()
    await pool.stop(grace=1.0)


def serve(settings: Settings) -> int:
    import uvloop

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="hookd: %(message)s")
    return uvloop.run(run(settings))
