"""`POST /events`: Aperture's `entire_request` events, matched to what the hook did, counted.

Aperture calls a post-response hook once a request has completed and does not wait for the
answer (it drains and ignores it). hookd reads the body under the hook's caps (`--read-timeout`,
50 MiB on the wire and decoded), answers `{"action":"allow"}` at once (harmless if the URL is
ever wired as a `pre_request` hook by mistake), and only then, once no hook call is in progress
(`hookd.deferred`, at most `BACKLOG_DELAY_S` later), decodes and reads the event: the usage in
it (`hookd.usage`), the facts the hook recorded for the same `request_id` (`hookd.ledger`),
hookd's estimate of the bill without it (`hookd.estimator`), and the series of
`hookd.usage_metrics`. No worker is involved, and nothing of the event's content is kept or
logged: only its token counts and labels reach the counters. It is served by the front end on
/events, or with --events-listen by a process of its own (`hookd.counter`), with its own ledger.

Every event is answered 200 (401 without the hook token when one is set, 405 for a method other
than POST) and counted under one outcome of `hookd_usage_events_total`: matched, unmatched (usage
of a request hookd had not answered, or whose record expired), no-usage (no readable usage
anywhere), invalid (not a JSON object), decode-error, too-large, read-error, encoding (a coding
hookd does not decode), unauthorized, method, error (a bug of ours, logged without content).

Requests hookd answered whose event never comes (no grant sends them, or Aperture dropped it)
leave the ledger when it expires them; the cache model's estimate is counted for them then, in the
`hookd_modelled_*` series. A sweep expires the ledger every `SWEEP_S`, so those counts arrive
without waiting for traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from hookd import auth, codings, estimator, protocol, usage
from hookd.deferred import Deferred, Quiet
from hookd.hook import ReadError, offload, read_body
from hookd.ledger import Facts, Ledger
from hookd.metrics import ModelLabels
from hookd.prices import Prices, resolve
from hookd.settings import Settings
from hookd.usage_metrics import UsageMetrics, UserLabels, Who

log = logging.getLogger("hookd.events")
PATH = "/events"
SWEEP_S = 30.0
# Events are counted while no hook call is in progress (`hookd.deferred`), at most this late,
# with at most this much of them waiting; past it they are counted on arrival.
BACKLOG_DELAY_S = 1.0
BACKLOG_BYTES = 16 * 1024 * 1024
OUTCOMES = (
    "matched",
    "unmatched",
    "no-usage",
    "invalid",
    "decode-error",
    "too-large",
    "read-error",
    "encoding",
    "unauthorized",
    "method",
    "error",
)
JSON = "application/json"


class Events:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        price_table: Callable[[], dict[str, Prices]],
        quiet: Quiet,
        registry: CollectorRegistry,
        models: ModelLabels,
    ) -> None:
        """`ledger`: what the hook noted of each request. `price_table`: the prices in force.
        `quiet`: whether a hook call is in progress in this process. The series go to
        `registry`, sharing the hook's `models` labels when they are in the same one."""
        self.settings = settings
        self.ledger = ledger
        self.price_table = price_table
        users = UserLabels(settings.max_user_labels, settings.user_hash_key)
        self.metrics = UsageMetrics(registry, models, users)
        for outcome in OUTCOMES:
            self.metrics.events.labels(outcome)
        ledger.unmatched = self.modelled
        self.deferred = Deferred(quiet, BACKLOG_BYTES, BACKLOG_DELAY_S)
        self.metrics.pending.set_function(lambda: len(ledger))

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", PATH, self.receive)
        app.cleanup_ctx.append(self.sweeping)
        app.cleanup_ctx.append(self.counting)

    async def receive(self, request: web.Request) -> web.StreamResponse:
        if not auth.allowed(request, self.settings.hook_token):
            self.count("unauthorized")
            return _answer(
                401, b'{"error":"missing or wrong hook token"}', {"WWW-Authenticate": 'Bearer realm="hookd"'}
            )
        if request.method != "POST":
            self.count("method")
            return _answer(405, b'{"error":"events take POST"}', {"Allow": "POST"})
        try:
            chain = codings.parse_content_encoding(request.headers.get("Content-Encoding"))
        except codings.UnsupportedCoding:
            self.count("encoding")
            return _answer(200, protocol.ALLOW)
        try:
            wire = await read_body(request, self.settings)
        except codings.TooLarge:
            self.count("too-large")
            return _answer(200, protocol.ALLOW, close=True)
        except ReadError:
            self.count("read-error")
            return _answer(200, protocol.ALLOW, close=True)
        response = _answer(200, protocol.ALLOW)
        # Answered before any work: Aperture's call is fire and forget, so nothing of ours
        # should keep its connection waiting.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.prepare(request)
            await response.write_eof()
        await self.deferred.submit(len(wire), lambda: self.count_body(wire, chain))
        return response

    async def count_body(self, wire: bytearray, chain: list[str]) -> None:
        try:
            decoded = await offload(len(wire), codings.decode, wire, chain, self.settings.max_decoded_bytes)
        except codings.TooLarge:
            self.count("too-large")
        except codings.CorruptBody:
            self.count("decode-error")
        else:
            try:
                self.settle(decoded)
            except Exception as exc:
                _bug(exc)
                self.count("error")

    def settle(self, decoded: bytes | bytearray) -> None:
        try:
            event = usage.read(orjson.loads(decoded))
        except orjson.JSONDecodeError:
            event = None
        if event is None:
            self.count("invalid")
            return
        if event.usage is None:
            # The hook's record stays: if no usable event follows, the cache model counts it.
            self.count("no-usage")
            return
        facts = self.ledger.take(event.request_id) if event.request_id else None
        if facts is None:
            prices = self.prices(event.provider, event.model)
            who = self.metrics.who(event.provider, event.model, event.user)
            self.metrics.observed(who, prices, event.usage, event.usage, None, event.dollars)
            self.count("unmatched")
            return
        who, prices = self.identify(facts, event.provider, event.model, event.user)
        without = estimator.without_hookd(event.usage, facts, prices)
        self.metrics.observed(who, prices, event.usage, without, removed(facts), event.dollars)
        self.count("matched")

    def modelled(self, facts: Facts) -> None:
        """A request hookd answered whose event did not come in time. Called from inside the
        hook's own request (the ledger expires entries as it notes new ones): counting must not
        fail it."""
        try:
            who, prices = self.identify(facts)
            self.metrics.modelled_only(who, prices, facts.modelled, facts.modelled_without, removed(facts))
        except Exception as exc:
            _bug(exc)

    def identify(self, facts: Facts, provider: str = "", model: str = "", user: str = "") -> tuple[Who, Prices]:
        """Labels and prices from what the hook saw, else from the event."""
        provider, model, user = facts.provider or provider, facts.model or model, facts.user or user
        return self.metrics.who(provider, model, user), self.prices(provider, model)

    def prices(self, provider: str, model: str) -> Prices:
        return resolve(self.price_table(), provider, model)

    def count(self, outcome: str) -> None:
        self.metrics.events.labels(outcome).inc()

    async def counting(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.deferred.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.deferred.finish()

    async def sweeping(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sweep())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                self.ledger.expire()
            except Exception as exc:
                # Counting must never take the service down; the next sweep tries again.
                _bug(exc)


def _bug(exc: Exception) -> None:
    """A bug of ours, logged by where it happened: the event's content stays out of the log."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    log.error("usage not counted: %s at %s:%d", type(exc).__name__, frame.filename, frame.lineno)


def removed(facts: Facts) -> int:
    return max(0, facts.tokens_before - facts.tokens_after)


def _answer(status: int, body: bytes, headers: dict[str, str] | None = None, close: bool = False) -> web.Response:
    response = web.Response(status=status, body=body, content_type=JSON, headers=headers)
    if close:
        # The rest of an oversized or broken body is not worth reading: answer and hang up.
        response.force_close()
    return response
