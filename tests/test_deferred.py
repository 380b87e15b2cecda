"""Work deferred while hook calls are in progress: when it runs, and that none of it is lost."""

from __future__ import annotations

import asyncio

import pytest

from hookd.deferred import Deferred, Quiet, Work


def recorder(done: list[str], name: str) -> Work:
    async def work() -> None:
        done.append(name)

    return work


async def test_with_no_call_in_progress_work_runs_at_once() -> None:
    done: list[str] = []
    deferred = Deferred(Quiet(), max_bytes=1000, max_delay=60)
    await deferred.submit(10, recorder(done, "a"))
    assert done == ["a"]


async def test_work_waits_for_calls_in_progress_then_runs_in_order() -> None:
    done: list[str] = []
    quiet = Quiet()
    deferred = Deferred(quiet, max_bytes=1000, max_delay=60)
    runner = asyncio.create_task(deferred.run())
    with quiet.busy():
        await deferred.submit(10, recorder(done, "a"))
        await deferred.submit(10, recorder(done, "b"))
        await asyncio.sleep(0.05)
        assert done == []
    while len(done) < 2:
        await asyncio.sleep(0.01)
    assert done == ["a", "b"]
    runner.cancel()


async def test_past_its_bytes_the_queue_runs_work_at_once() -> None:
    done: list[str] = []
    quiet = Quiet()
    deferred = Deferred(quiet, max_bytes=100, max_delay=60)
    with quiet.busy():
        await deferred.submit(80, recorder(done, "queued"))
        await deferred.submit(80, recorder(done, "over"))
    assert done == ["over"]
    assert deferred.bytes == 80


async def test_what_is_left_at_shutdown_runs_and_a_failure_stops_nothing(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []
    quiet = Quiet()
    deferred = Deferred(quiet, max_bytes=1000, max_delay=60)

    async def broken() -> None:
        raise KeyError("request content")

    with quiet.busy():
        await deferred.submit(10, broken)
        await deferred.submit(10, recorder(done, "after"))
        await deferred.finish()
    assert done == ["after"]
    assert deferred.bytes == 0 and not deferred.items
    assert "KeyError" in caplog.text and "request content" not in caplog.text
