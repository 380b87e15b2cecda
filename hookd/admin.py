"""The operator's endpoints: health, readiness, metrics and runtime settings (`/config`)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from hookd import auth, config, prices
from hookd.compressor import Compressor
from hookd.counter_link import CounterLink
from hookd.metrics import CONTENT_TYPE, Metrics
from hookd.settings import Settings

log = logging.getLogger("hookd.admin")
# Settings changes are small JSON objects; anything bigger is not one.
MAX_CONFIG_BODY = 64 * 1024


class Admin:
    def __init__(
        self,
        settings: Settings,
        compressor: Compressor,
        metrics: Metrics,
        store: config.Store,
        counter: CounterLink | None = None,
    ) -> None:
        """`counter`: the events process (--events-listen), whose series this page shows after
        the front end's own."""
        self.settings = settings
        self.compressor = compressor
        self.metrics = metrics
        self.store = store
        self.counter = counter
        self.draining = False

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/config", self.get_config)
        app.router.add_put("/config", self.put_config)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        workers = self.compressor.worker_info()
        # Readiness is the hook's: without the events process, events wait in its listener's
        # queue or go uncounted, and no request is worse off.
        facts: dict[str, Any] = {"workers": workers}
        if self.counter is not None:
            facts["events_process"] = self.counter.info()
        if self.draining:
            return web.json_response({"status": "draining", "reason": "shutting down", **facts}, status=503)
        if self.compressor.ready():
            return web.json_response({"status": "ready", **facts})
        waiting = [w["slot"] for w in workers if w["state"] not in ("idle", "busy")]
        reason = f"workers {waiting} are starting or restarting"
        return web.json_response({"status": "starting", "reason": reason, **facts}, status=503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        page = await self.metrics.render_yielding()
        if self.counter is not None:
            page += await self.counter.page()
        return web.Response(body=page, headers={"Content-Type": CONTENT_TYPE})

    async def get_config(self, request: web.Request) -> web.Response:
        if not (auth.allowed(request, self.settings.hook_token) or self._is_admin(request)):
            return _error(401, "missing or wrong token")
        return web.json_response(self.document())

    async def put_config(self, request: web.Request) -> web.Response:
        if self.settings.admin_token is not None:
            if not self._is_admin(request):
                return _error(401, "PUT /config needs the admin token")
        elif not auth.from_loopback(request):
            return _error(403, "PUT /config from another host needs --admin-token-file on the server")
        if (request.content_length or 0) > MAX_CONFIG_BODY:
            return _error(400, f"settings body over {MAX_CONFIG_BODY} bytes")
        try:
            change = orjson.loads(await request.content.read(MAX_CONFIG_BODY + 1))
        except orjson.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        try:
            self.store.update(change, self._profiles())
        except config.InvalidSettings as exc:
            return _error(400, str(exc))
        except OSError as exc:
            log.error("could not save settings: %s", exc)
            return _error(500, f"could not save settings: {exc.strerror or exc}")
        if self.counter is not None:
            self.counter.send_prices()
        log.info("settings changed: %s", ", ".join(sorted(change)))
        return web.json_response(self.document())

    def _is_admin(self, request: web.Request) -> bool:
        return self.settings.admin_token is not None and auth.allowed(request, self.settings.admin_token)

    def _profiles(self) -> list[str] | None:
        for worker in self.compressor.worker_info():
            if "savings_profiles" in worker:
                return list(worker["savings_profiles"])
        return None

    def document(self) -> dict[str, Any]:
        workers = self.compressor.worker_info()
        warm = [w for w in workers if "headroom_version" in w]
        return {
            **self.store.values,
            # The whole table in force; a PUT of `cache_prices` sets the rows that differ.
            "cache_prices": prices.as_document(self.store.price_table()),
            "headroom_version": warm[0]["headroom_version"] if warm else None,
            **ml_summary(warm),
            "savings_profiles": self._profiles(),
            "workers": workers,
        }


def ml_summary(warm: list[dict[str, Any]]) -> dict[str, Any]:
    """Text compression is on only when every warm worker has it: half-on would make the same
    text compress or not depending on the worker it lands on."""
    active = bool(warm) and all(w.get("ml_text_compression") for w in warm)
    summary: dict[str, Any] = {"ml_text_compression": active}
    reasons = sorted({w["ml_reason"] for w in warm if w.get("ml_reason")})
    if reasons:
        summary["ml_reason"] = "; ".join(reasons)
    if active:
        summary["ml_provider"] = warm[0].get("ml_provider")
    return summary


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
