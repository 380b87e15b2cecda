"""aiohttp's runner as hookd serves with it: the hook's listener and the events process's alike."""

from __future__ import annotations

from aiohttp import web

# Answers already decided when the drain time ran out still need a moment to be written.
WRITE_MARGIN_S = 2.0
IDLE_TIMEOUT_S = 120.0


async def make_runner(app: web.Application) -> web.AppRunner:
    # auto_decompress off: we count the bytes that crossed the wire and decode them ourselves
    # under a size cap. Handlers are not cancelled when a client hangs up, so an abandoned
    # compression still finishes and leaves its worker warm.
    runner = web.AppRunner(
        app,
        auto_decompress=False,
        access_log=None,
        handler_cancellation=False,
        # The drain has already waited for the answers (Site.settle); this bounds only what is
        # left once the drain time is up.
        shutdown_timeout=WRITE_MARGIN_S,
        # Also bounds a connection that never completes its headers (slowloris): aiohttp closes
        # it once this passes. Longer than Go's 90 s idle timeout, so Aperture's client closes
        # its idle connections first and never sends on one we are closing.
        keepalive_timeout=IDLE_TIMEOUT_S,
    )
    await runner.setup()
    return runner
