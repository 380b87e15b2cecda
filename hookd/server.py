"""Start-up, serving and shutdown: wires settings, pool, handlers and systemd together.

Start-up listens at once (so /healthz answers and /readyz can say "starting"), spawns the
workers, and tells systemd READY=1 only when every worker is warm. The first SIGTERM or SIGINT
drains: no new connections, requests in flight finish or are answered `allow` when the drain
time is up, workers are stopped, exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from hookd.admin import Admin, ml_summary
from hookd.compressor import Compressor
from hookd.config import Store
from hookd.events import Events
from hookd.hook import Hook
from hookd.metrics import Metrics
from hookd.sdnotify import Notifier
from hookd.settings import Settings
from hookd.shared_state import open_records
from hookd.sticky import Records

log = logging.getLogger("hookd")
# Answers already decided when the drain time ran out still need a moment to be written.
WRITE_MARGIN_S = 2.0
EXIT_ON_SECOND_SIGNAL = 130
IDLE_TIMEOUT_S = 120.0
ADMIN = web.AppKey("admin", Admin)
HOOK = web.AppKey("hook", Hook)


def build_app(
    settings: Settings,
    compressor: Compressor,
    metrics: Metrics,
    store: Store,
    clock: Callable[[], float] = time.time,
    records: Records | None = None,
) -> web.Application:
    """`records`: where conversation records live (this process's memory unless given)."""
    app = web.Application()
    admin = Admin(settings, compressor, metrics, store)
    hook = Hook(settings, compressor, metrics, store, clock, records)
    admin.routes(app)
    Events(settings, hook, metrics).routes(app)
    # The hook answers on every other path: the operator picks the URL in Aperture's config.
    app.router.add_route("*", "/{tail:.*}", hook.hook)
    app[ADMIN], app[HOOK] = admin, hook
    return app


async def start_site(app: web.Application, settings: Settings) -> web.AppRunner:
    # auto_decompress off: we count the bytes that crossed the wire and decode them ourselves
    # under a size cap. Handlers are not cancelled when a client hangs up, so an abandoned
    # compression still finishes and leaves its worker warm.
    runner = web.AppRunner(
        app,
        auto_decompress=False,
        access_log=None,
        handler_cancellation=False,
        shutdown_timeout=settings.drain_timeout + WRITE_MARGIN_S,
        # Also bounds a connection that never completes its headers (slowloris): aiohttp closes
        # it once this passes. Longer than Go's 90 s idle timeout, so Aperture's client closes
        # its idle connections first and never sends on one we are closing.
        keepalive_timeout=IDLE_TIMEOUT_S,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    return runner


async def run(settings: Settings) -> int:
    from hookd.pool import WorkerPool

    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = Store(settings.state_dir, settings.affinity_wait)
    metrics = Metrics()
    pool = WorkerPool(settings, metrics)
    app = build_app(settings, pool, metrics, store, records=await open_records(settings, metrics))
    notifier = Notifier()
    runner = await start_site(app, settings)
    log.info("listening on http://%s:%d/ with %d workers", settings.host, settings.port, settings.pool_size)
    await pool.start()
    stop = asyncio.Event()
    _handle_signals(stop)
    announcing = asyncio.create_task(_announce_ready(pool, notifier, settings))
    await stop.wait()
    announcing.cancel()
    await _drain(app, runner, pool, notifier, settings)
    return 0


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


async def _announce_ready(pool: Compressor, notifier: Notifier, settings: Settings) -> None:
    """READY=1 once every worker is warm, then watchdog keep-alives from this event loop: if
    the loop stalls, the keep-alives stop and systemd restarts us."""
    while not await pool.wait_ready(settings.warmup_timeout):
        log.warning("workers are not all warm after %.0f s; still waiting", settings.warmup_timeout)
    log.info("all %d workers warm; %s", settings.pool_size, ml_line(ml_summary(pool.worker_info())))
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
    app: web.Application, runner: web.AppRunner, pool: Compressor, notifier: Notifier, settings: Settings
) -> None:
    app[ADMIN].draining = True
    notifier.send("STOPPING=1", "STATUS=draining")
    loop = asyncio.get_running_loop()
    loop.call_later(settings.drain_timeout, app[HOOK].drain_expired.set)
    # Stops listening, then waits for the handlers in flight; each answers by the drain time.
    await runner.cleanup()
    await pool.stop(grace=1.0)
    log.info("stopped")


def serve(settings: Settings) -> int:
    import uvloop

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="hookd: %(message)s")
    return uvloop.run(run(settings))
