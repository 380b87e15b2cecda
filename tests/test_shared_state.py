"""Shared conversation state (--state-url) between replicas, in process: real Redis, fake compressor.

Each replica is the real app with its own records object on one real `redis-server`, so these tests
show what a user of two replicas sees: the same history from either, only what is new fetched,
concurrent turns never mixed, and Redis failing costing a request nothing but its allowance.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hookd import server, sticky
from hookd.affinity import session_key
from hookd.config import Store
from hookd.metrics import Metrics
from hookd.redis_link import Breaker
from hookd.settings import Settings
from hookd.shared_state import Shared, open_records
from tests import deployment
from tests.fakes import FakeCompressor
from tests.hookd_process import free_port
from tests.test_sticky_hook import conversation, same_prefix, send

ALLOWANCE_S = 0.05
# What the tests that are not about Redis being slow give it, so a busy machine does not make them so.
PATIENT_S = 2.0
# Far below any pause these tests give Redis, far above what a request costs on a busy machine.
PROMPT_S = 1.0
KEY = os.urandom(32)


@dataclasses.dataclass
class Replica:
    url: str
    fake: FakeCompressor
    http: aiohttp.ClientSession
    metrics: Metrics
    records: Shared

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    why = deployment.missing()
    if why:
        pytest.skip(why)
    redis = deployment.Redis(tmp_path_factory.mktemp("redis"))
    yield redis
    redis.stop()


@pytest.fixture
async def replica(redis_server: deployment.Redis, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts a replica: the real app on the shared Redis, with a fake compressor."""
    redis_server.cli("FLUSHALL")
    runners: list[Any] = []
    replicas: list[Replica] = []

    async def _start(key: bytes = KEY, state_timeout: float = PATIENT_S) -> Replica:
        settings = dataclasses.replace(
            Settings(port=free_port()),
            state_url=redis_server.url,
            state_password=deployment.HOOKD_PASSWORD,
            state_key=key,
            state_timeout=state_timeout,
        )
        metrics = Metrics()
        records = await open_records(settings, metrics)
        assert isinstance(records, Shared)
        await records.checked
        fake = FakeCompressor()
        store = Store(tmp_path / f"state-{len(runners)}", settings.affinity_wait)
        app = server.build_app(settings, fake, metrics, store, records=records)
        runners.append(await server.start_site(app, settings))
        made = Replica(f"http://127.0.0.1:{settings.port}/", fake, aiohttp.ClientSession(), metrics, records)
        replicas.append(made)
        return made

    yield _start
    for made in replicas:
        await made.http.close()
        await made.records.close()
    for runner in runners:
        await runner.cleanup()
    redis_server.signal(signal.SIGCONT)
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()


async def test_either_replica_sends_the_history_the_other_sent(replica: Callable[..., Any]) -> None:
    a, b = await replica(), await replica()
    previous = await send(a.http, a.url, conversation(2))
    for turn in range(3, 9):
        served = a if turn % 2 else b
        sent = await send(served.http, served.url, conversation(turn))
        assert same_prefix(previous, sent)
        # Only the new messages (and a little context) went to the worker: the history came from Redis.
        assert served.fake.jobs[-1].frozen > 0
        previous = sent


def bulky(turns: int) -> list[dict[str, Any]]:
    """Tool results that stay large once compressed: one long output cut, many short lines kept."""
    messages = conversation(turns)
    for message in messages[2::2]:
        result = message["content"][0]
        lines = [{"type": "text", "text": f"kept line {i}"} for i in range(100)]
        result["content"] = [{"type": "text", "text": result["content"]}, *lines]
    return messages


async def test_a_replica_fetches_only_what_it_has_not_seen(replica: Callable[..., Any]) -> None:
    a, b = await replica(), await replica()
    await send(a.http, a.url, bulky(12))
    await send(b.http, b.url, bulky(13))
    whole = b.count("hookd_state_fetched_bytes_total")
    before = a.count("hookd_state_fetched_bytes_total")
    await send(a.http, a.url, bulky(14))
    # a had the first twelve turns already: it fetched the manifest and b's one turn, not the history.
    assert a.count("hookd_state_fetched_bytes_total") - before < whole / 3
    # A turn on the replica that served the last one costs one round trip and fetches nothing.
    before = a.count("hookd_state_fetched_bytes_total")
    await send(a.http, a.url, bulky(15))
    assert a.count("hookd_state_fetched_bytes_total") == before
    assert a.count("hookd_state_lookups_total", source="local") == 1


async def test_of_two_concurrent_turns_only_the_first_is_recorded(replica: Callable[..., Any]) -> None:
    a, b = await replica(), await replica()
    await send(a.http, a.url, conversation(3))
    current = sticky.digests(conversation(4))
    key = sticky.record_key(session_key("s1", conversation(4)), current)
    read_a = await a.records.lookup(key, current)
    read_b = await b.records.lookup(key, current)
    assert read_a is not None and read_b is not None and read_a.emitted == read_b.emitted
    # Each replica sent its own form of the last message.
    originals = conversation(4)
    first = sticky.remember(read_a, current, originals, [*originals[:-1], {"role": "user", "content": "a"}])
    second = sticky.remember(read_b, current, originals, [*originals[:-1], {"role": "user", "content": "b"}])
    assert await a.records.commit(key, first, read_a)
    assert not await b.records.commit(key, second, read_b)
    assert b.count("hookd_state_conflicts_total") == 1
    # Whoever reads it next gets the first writer's record, whole.
    c = await replica()
    found = await c.records.lookup(key, current)
    assert found is not None and found.emitted == first.emitted


async def test_redis_stopped_then_back(
    replica: Callable[..., Any], redis_server: deployment.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "hookd")
    a, b = await replica(), await replica()
    previous = await send(a.http, a.url, conversation(2))
    redis_server.stop()
    for turn in range(3, 12):
        started = time.monotonic()
        sent = await send(a.http, a.url, conversation(turn))
        assert time.monotonic() - started < PROMPT_S
        # The replica serves the conversation from its own memory, as a single hookd would.
        assert same_prefix(previous, sent)
        previous = sent
    async with a.http.get(a.url + "readyz") as response:
        assert response.status == 200
    assert a.count("hookd_state_errors_total", reason="connection") >= 1
    assert a.count("hookd_state_available") == 0
    assert len([r for r in caplog.records if "is failing" in r.message]) == 1

    redis_server.start()
    deadline = time.monotonic() + 10
    turn = 12
    while a.count("hookd_state_available") == 0 and time.monotonic() < deadline:
        sent = await send(a.http, a.url, conversation(turn))
        assert same_prefix(previous, sent)
        previous, turn = sent, turn + 1
        time.sleep(0.2)
    assert a.count("hookd_state_available") == 1
    assert len([r for r in caplog.records if "answering again" in r.message]) == 1
    # What a served while Redis was away reached Redis with its next turn: b carries on from it.
    sent = await send(b.http, b.url, conversation(turn))
    assert same_prefix(previous, sent)
    assert b.fake.jobs[-1].frozen > 0


async def test_a_paused_redis_costs_a_request_no_more_than_its_allowance(
    replica: Callable[..., Any], redis_server: deployment.Redis
) -> None:
    a = await replica(state_timeout=ALLOWANCE_S)
    await send(a.http, a.url, conversation(2))
    redis_server.signal(signal.SIGSTOP)
    try:
        durations = []
        for turn in range(3, 10):
            started = time.monotonic()
            await send(a.http, a.url, conversation(turn))
            durations.append(time.monotonic() - started)
        assert a.count("hookd_state_errors_total", reason="timeout") >= 1
        assert a.count("hookd_state_skipped_total") >= 1
    finally:
        redis_server.signal(signal.SIGCONT)
    # Redis is paused for good as far as any request can tell: none waited for it past its allowance.
    assert max(durations) < ALLOWANCE_S + PROMPT_S
    time.sleep(4)  # the breaker's open time
    await send(a.http, a.url, conversation(10))
    assert a.count("hookd_state_available") == 1


async def test_a_replica_with_another_key_shares_nothing_and_disturbs_nothing(replica: Callable[..., Any]) -> None:
    a, b = await replica(), await replica(key=os.urandom(32))
    first = await send(a.http, a.url, conversation(2))
    await send(b.http, b.url, conversation(3))
    assert b.fake.jobs[-1].frozen == 0
    assert same_prefix(first, await send(a.http, a.url, conversation(4)))
    assert a.fake.jobs[-1].frozen > 0


async def test_an_altered_record_is_not_used(replica: Callable[..., Any], redis_server: deployment.Redis) -> None:
    a, b = await replica(), await replica()
    await send(a.http, a.url, conversation(2))
    (manifest,) = [k for k in redis_server.cli("--scan").stdout.split() if k.endswith(":m")]
    redis_server.cli("HSET", manifest, "m", "\x01" + "x" * 64)
    await send(b.http, b.url, conversation(3))
    assert b.count("hookd_state_errors_total", reason="unreadable") == 1
    assert b.fake.jobs[-1].frozen == 0
    # The fresh record b made replaces it, for every replica.
    await send(a.http, a.url, conversation(4))
    assert a.fake.jobs[-1].frozen > 0


async def test_an_evicted_conversation_goes_on_where_a_replica_has_it(
    replica: Callable[..., Any], redis_server: deployment.Redis
) -> None:
    a, b = await replica(), await replica()
    await send(a.http, a.url, conversation(2))
    previous = await send(b.http, b.url, conversation(3))
    for key in redis_server.cli("--scan").stdout.split():
        if key.endswith(":b"):
            redis_server.cli("DEL", key)  # as maxmemory-policy would
    # a's copy is older than Redis's manifest, which cannot be read whole: a starts afresh.
    await send(a.http, a.url, conversation(4))
    assert a.fake.jobs[-1].frozen == 0
    # With everything gone, b carries on from its own copy, and Redis has it again.
    redis_server.cli("FLUSHALL")
    sent = await send(b.http, b.url, conversation(5))
    assert b.fake.jobs[-1].frozen > 0 and same_prefix(previous, sent)
    assert any(k.endswith(":m") for k in redis_server.cli("--scan").stdout.split())


LIMITED = ("--user", "limited", "on", f">{deployment.HOOKD_PASSWORD}", "~hookd:*", "+@all", "-config")


@pytest.mark.parametrize(
    ("extra", "said", "warnings"),
    [
        ((), "sealed with the key file", 0),
        (("--save", "3600 1"), "writes to disk", 1),
        (("--maxmemory", "0"), "no memory bound", 1),
        (LIMITED, "could not read its configuration", 0),
    ],
)
async def test_the_start_up_check_warns_about_persistence_and_tolerates_acls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: tuple[str, ...], said: str, warnings: int
) -> None:
    why = deployment.missing()
    if why:
        pytest.skip(why)
    caplog.set_level(logging.INFO, "hookd")
    redis = deployment.Redis(tmp_path, *extra)
    try:
        url = redis.url.replace("hookd@", "limited@") if "limited" in extra else redis.url
        settings = Settings(state_url=url, state_password=deployment.HOOKD_PASSWORD, state_key=KEY)
        records = await open_records(settings, Metrics())
        assert isinstance(records, Shared)
        await records.checked
        await records.close()
    finally:
        redis.stop()
    assert said in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == warnings


def test_the_breaker_stops_asking_a_failing_redis_for_a_while() -> None:
    now = [0.0]
    breaker = Breaker(lambda: now[0], failures=3, open_s=3.0)
    assert not breaker.failed() and not breaker.failed()
    assert breaker.failed()  # the third in a row opens it: said once
    assert not breaker.allow()
    now[0] = 3.5
    assert breaker.allow()  # one probe
    assert not breaker.allow()  # and only one
    assert not breaker.failed()  # a failed probe keeps it open, without saying so again
    now[0] = 5.0
    assert not breaker.allow()
    now[0] = 7.0
    assert breaker.allow() and breaker.succeeded()  # back: said once
    assert breaker.allow() and breaker.allow()
