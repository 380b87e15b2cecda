"""Talking to Redis without ever making a request wait on it: the connection, the time one request
may spend on Redis, the circuit breaker, and what the log and `/metrics` say about Redis's health.

Redis is an optimisation, not a dependency: whatever it does, a request is answered as fast as
without it. So each request gets one allowance for all its Redis calls together (`--state-timeout`),
and a call that times out, is refused or loses its connection raises `Unavailable`, which callers
treat as "Redis has nothing". After a few failures in a row the breaker opens and no call is tried
for a few seconds; then one request probes, and the next calls go through once it succeeds. The log
says when Redis stops answering and when it is back, once each, never per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hookd.metrics import Metrics

log = logging.getLogger("hookd")
T = TypeVar("T")

FAILURES = 3
OPEN_S = 3.0
# Connections to Redis at once: a call waits for one within its allowance, so a burst of
# requests queues for a moment instead of failing, and a paused Redis cannot make us open
# connections without end.
MAX_CONNECTIONS = 32
# The start-up check is not in any request's path, so it may wait longer.
CHECK_S = 2.0


class Unavailable(Exception):
    """Redis did not answer within the request's allowance, or is not being asked right now."""


@dataclass
class Allowance:
    seconds: float


# One per request: the handler's task sets it when a turn begins, and every Redis call the turn
# makes afterwards draws on it, however long the compression between those calls took.
_allowance: contextvars.ContextVar[Allowance | None] = contextvars.ContextVar("hookd_redis_allowance", default=None)


def redacted(url: str) -> str:
    """The URL without its user and password, for the log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    where = f"[{host}]" if ":" in host else host
    if parts.port:
        where += f":{parts.port}"
    return f"{parts.scheme}://{where}{parts.path}"


def connect(url: str, password: str | None) -> redis.Redis:
    options = {"password": password} if password is not None else {}
    pool = redis.BlockingConnectionPool.from_url(
        url,
        # One quick retry: after Redis restarts, each pooled connection fails once before it is
        # replaced. The allowance bounds the retry and the wait for a connection, as the call.
        retry=Retry(NoBackoff(), 1),
        max_connections=MAX_CONNECTIONS,
        timeout=None,
        **options,
    )
    return redis.Redis.from_pool(pool)


class Breaker:
    """Closed while Redis answers; open for `open_s` after `failures` failures in a row; then one
    call probes, and its outcome closes or reopens it."""

    def __init__(self, clock: Callable[[], float], failures: int = FAILURES, open_s: float = OPEN_S) -> None:
        self.clock = clock
        self.limit = failures
        self.open_s = open_s
        self.failures = 0
        self.open_until: float | None = None
        # While a probe is out, no other call goes; a probe that never reports back (its request
        # cancelled) frees the way after another open time.
        self.probe_until = 0.0
        self.opened_at = 0.0

    @property
    def closed(self) -> bool:
        return self.open_until is None

    def allow(self) -> bool:
        if self.open_until is None:
            return True
        now = self.clock()
        if now < self.open_until or now < self.probe_until:
            return False
        self.probe_until = now + self.open_s
        return True

    def succeeded(self) -> bool:
        """True when this closed the breaker."""
        self.failures = 0
        self.probe_until = 0.0
        if self.open_until is None:
            return False
        self.open_until = None
        return True

    def failed(self) -> bool:
        """True when this opened the breaker."""
        self.failures += 1
        was_closed = self.open_until is None
        if not was_closed or self.failures >= self.limit:
            if was_closed:
                self.opened_at = self.clock()
            self.open_until = self.clock() + self.open_s
        self.probe_until = 0.0
        return was_closed and self.open_until is not None


class Link:
    def __init__(
        self,
        client: redis.Redis,
        budget: float,
        metrics: Metrics,
        where: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.budget = budget
        self.metrics = metrics
        self.where = where
        self.breaker = Breaker(clock)
        self.clock = clock
        metrics.state_available.set(1)

    def begin_turn(self) -> None:
        """A new request's allowance: every call it makes from now on draws on it."""
        _allowance.set(Allowance(self.budget))

    async def call(self, op: str, command: Callable[[], Awaitable[T]]) -> T:
        allowance = _allowance.get()
        if allowance is None:
            allowance = Allowance(self.budget)
            _allowance.set(allowance)
        if allowance.seconds <= 0 or not self.breaker.allow():
            self.metrics.state_skipped.inc()
            raise Unavailable("not asked")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(allowance.seconds):
                result = await command()
        except Exception as exc:
            self._failed(op, exc)
            raise Unavailable(str(exc) or type(exc).__name__) from None
        finally:
            elapsed = time.perf_counter() - started
            allowance.seconds -= elapsed
            self.metrics.state_duration.labels(op).observe(elapsed)
        if self.breaker.succeeded():
            self.metrics.state_available.set(1)
            log.info(
                "shared state at %s answering again after %.1f s", self.where, self.clock() - self.breaker.opened_at
            )
        return result

    def _failed(self, op: str, exc: Exception) -> None:
        reason = failure_reason(exc)
        self.metrics.state_errors.labels(reason).inc()
        if self.breaker.failed():
            self.metrics.state_available.set(0)
            log.warning(
                "shared state at %s is failing (%s on %s: %s); each replica serves from its own memory "
                "and retries every %.0f s",
                self.where,
                reason,
                op,
                exc,
                self.breaker.open_s,
            )

    async def check(self) -> None:
        """Says at start-up whether Redis is reachable and whether it could write records to disk
        or grow without bound; never fails."""
        try:
            async with asyncio.timeout(CHECK_S):
                await self.client.ping()
        except Exception as exc:
            log.warning(
                "shared state at %s not reachable at start (%s: %s); serving from this replica's memory until it is",
                self.where,
                failure_reason(exc),
                exc,
            )
            return
        try:
            async with asyncio.timeout(CHECK_S):
                found = await self.client.config_get("save")
                found |= await self.client.config_get("appendonly")
                found |= await self.client.config_get("maxmemory")
                found |= await self.client.config_get("maxmemory-policy")
        except (ResponseError, TimeoutError) as exc:
            # Managed Redis services and ACL users often refuse CONFIG; that is theirs to decide.
            log.info(
                "shared state at %s: could not read its configuration (%s); make sure it runs with "
                'save "" and appendonly no, and a maxmemory with an LRU policy',
                self.where,
                exc,
            )
            return
        except Exception as exc:
            log.info("shared state at %s: could not read its configuration (%s)", self.where, exc)
            return
        config = {_text(k): _text(v) for k, v in found.items()}
        log.info("shared state at %s (records sealed with the key file)", self.where)
        if config.get("save") or config.get("appendonly") == "yes":
            log.warning(
                "Redis at %s writes to disk (save %r, appendonly %s): the records are sealed, but run it "
                'with save "" and appendonly no so that they never reach a disk',
                self.where,
                config.get("save"),
                config.get("appendonly"),
            )
        if config.get("maxmemory") == "0" or config.get("maxmemory-policy") == "noeviction":
            log.warning(
                "Redis at %s has no memory bound that evicts (maxmemory %s, policy %s): set maxmemory and "
                "maxmemory-policy volatile-lru or allkeys-lru",
                self.where,
                config.get("maxmemory"),
                config.get("maxmemory-policy"),
            )

    async def close(self) -> None:
        await self.client.aclose()


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    if isinstance(exc, ResponseError):
        return "refused"
    if isinstance(exc, RedisError):
        return "error"
    return "bug"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
