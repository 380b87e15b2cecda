"""The worker pool against fake worker processes that crash, hang, babble or stall on request."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hookd.affinity import session_key, slot_for
from hookd.compressor import CompressorError, Job, Overloaded
from hookd.metrics import Metrics
from hookd.pool import WorkerFailed, WorkerPool
from hookd.settings import Settings
from tests import fake_workers

MESSAGES = [{"role": "user", "content": "a long message " * 50}, {"role": "assistant", "content": "ok"}]
FAST = Settings(pool_size=2, max_compress=2.5, warmup_timeout=20, queue_timeout=2.0)


def job(behaviour: str = "ok", session: str = "s1") -> Job:
    key = session_key(session, MESSAGES)
    return Job(messages=MESSAGES, model="gpt-4o", key=key, knobs={"behaviour": behaviour}, affinity_wait=0.3)


def key_for_slot(slot: int, pool_size: int = 2) -> str:
    """A session id whose affinity slot is `slot`."""
    return next(f"s{i}" for i in range(1000) if slot_for(session_key(f"s{i}", MESSAGES), pool_size) == slot)


def pids(pool: WorkerPool) -> list[int | None]:
    return [w.process.pid if w.process else None for w in pool.workers]


MakePool = Callable[..., Any]


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    pools: list[WorkerPool] = []

    async def _make(settings: Settings = FAST, target: Any = fake_workers.run) -> WorkerPool:
        pool = WorkerPool(settings, Metrics(), target=target)
        pools.append(pool)
        await pool.start()
        return pool

    yield _make
    for pool in pools:
        await pool.stop(grace=1.0)


async def test_warm_pool_serves_and_merges_changed_messages(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    result = await pool.compress(job())
    assert result.messages[0] == {"role": "user", "content": "short"}
    assert result.messages[1] is MESSAGES[1]
    assert (result.tokens_before, result.tokens_after) == (100, 10)
    assert result.placement == "hit" and result.cold
    assert not (await pool.compress(job())).cold


async def test_crash_mid_request_fails_that_request_and_the_pool_recovers(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    before = pids(pool)
    with pytest.raises(WorkerFailed):
        await pool.compress(job("crash"))
    assert await pool.wait_ready(20)
    assert len(set(pids(pool)) - set(before)) == 1
    assert (await pool.compress(job())).tokens_after == 10
    assert pool.metrics.worker_restarts._value.get() == 1


@pytest.mark.parametrize("behaviour", ["garbage", "close", "wrong-id"])
async def test_broken_replies_fail_the_request_and_replace_the_worker(make_pool: MakePool, behaviour: str) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    before = pids(pool)
    with pytest.raises(WorkerFailed):
        await pool.compress(job(behaviour))
    assert await pool.wait_ready(20)
    assert pids(pool) != before
    assert (await pool.compress(job())).tokens_after == 10


async def test_hang_past_max_compress_is_cut_off(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"ran past"):
        await pool.compress(job("hang"))
    assert time.monotonic() - started < FAST.max_compress + 1.0
    assert await pool.wait_ready(20)
    assert (await pool.compress(job())).tokens_after == 10


async def test_an_error_reply_keeps_the_worker(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    before = pids(pool)
    with pytest.raises(CompressorError) as caught:
        await pool.compress(job("error"))
    assert not isinstance(caught.value, WorkerFailed)
    assert pids(pool) == before


async def test_busy_home_worker_spills_after_the_affinity_wait(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    session = key_for_slot(0)
    slow = asyncio.create_task(pool.compress(job("slow:1.5", session)))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    spilled = await pool.compress(job("ok", session))
    waited = time.monotonic() - started
    assert spilled.placement == "spill" and spilled.slot == 1
    assert 0.25 <= waited < 1.2
    assert (await slow).placement == "hit"
    assert pool.metrics.affinity_spills._value.get() == 1


async def test_busy_home_worker_that_frees_up_in_time_keeps_its_session(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    session = key_for_slot(1)
    first = asyncio.create_task(pool.compress(job("slow:0.1", session)))
    await asyncio.sleep(0.02)
    second = await pool.compress(job("ok", session))
    assert (await first).slot == second.slot == 1
    assert second.placement == "hit"


async def test_without_affinity_any_free_worker_serves(make_pool: MakePool) -> None:
    pool = await make_pool(Settings(**{**FAST.__dict__, "affinity": False}))
    assert await pool.wait_ready(20)
    results = await asyncio.gather(*(pool.compress(job("slow:0.2")) for _ in range(2)))
    assert {r.slot for r in results} == {0, 1}
    assert {r.placement for r in results} == {"any"}


async def test_all_workers_busy_answers_overload_within_the_queue_timeout(make_pool: MakePool) -> None:
    settings = Settings(**{**FAST.__dict__, "queue_timeout": 0.3, "max_compress": 5.0})
    pool = await make_pool(settings)
    assert await pool.wait_ready(20)
    busy = [asyncio.create_task(pool.compress(job("slow:1.5", key_for_slot(s)))) for s in (0, 1)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await pool.compress(job())
    assert time.monotonic() - started < settings.queue_timeout + 0.3
    await asyncio.gather(*busy)


async def test_abandoned_call_still_finishes_and_frees_its_worker(make_pool: MakePool) -> None:
    pool = await make_pool()
    assert await pool.wait_ready(20)
    call = asyncio.create_task(pool.compress(job("slow:0.5")))
    await asyncio.sleep(0.1)
    call.cancel()
    await asyncio.sleep(0.7)
    assert [w.state for w in pool.workers] == ["idle", "idle"]
    assert pool.metrics.worker_restarts._value.get() == 0


async def test_worker_failing_warmup_is_restarted_with_backoff(
    make_pool: MakePool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = tmp_path / "marks"
    monkeypatch.setenv("HOOKD_TEST_MARKS", str(marks))
    pool = await make_pool(Settings(**{**FAST.__dict__, "pool_size": 1}), target=fake_workers.fail_warmup)
    await asyncio.sleep(4)
    starts = [float(line) for line in marks.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.5 s, 1 s, 2 s...: a handful of attempts, never a fork storm.
    assert 2 <= len(starts) <= 5
    assert all(later >= earlier for earlier, later in itertools.pairwise(gaps))
    assert not pool.ready()
    with pytest.raises(Overloaded):
        await pool.compress(job())


async def test_worker_past_the_memory_limit_is_replaced_between_requests(make_pool: MakePool) -> None:
    pool = await make_pool(Settings(**{**FAST.__dict__, "worker_max_rss_mb": 1000}))
    assert await pool.wait_ready(20)
    before = pids(pool)
    result = await pool.compress(job("bloat"))
    assert result.tokens_after == 10
    assert await pool.wait_ready(20)
    assert len(set(pids(pool)) - set(before)) == 1
    assert pool.metrics.worker_recycles._value.get() == 1
    assert (await pool.compress(job())).tokens_after == 10


async def test_a_full_queue_answers_overload_at_once(make_pool: MakePool) -> None:
    settings = Settings(**{**FAST.__dict__, "queue_per_worker": 1, "queue_timeout": 2.0})
    pool = await make_pool(settings)
    assert await pool.wait_ready(20)
    busy = [asyncio.create_task(pool.compress(job("slow:1", key_for_slot(s)))) for s in (0, 1)]
    await asyncio.sleep(0.1)
    waiting = [asyncio.create_task(pool.compress(job("ok", f"w{i}"))) for i in range(2)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(Overloaded, match="already waiting"):
        await pool.compress(job())
    assert time.monotonic() - started < 0.1
    await asyncio.gather(*busy, *waiting)
