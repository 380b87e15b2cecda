"""Fault injection against the real `hookd`: real worker processes, real headroom, real signals.

Each test starts its own server (so counters and crash history start at zero), injects one kind
of fault and checks what a user of the hook would see: every request answered 200 `allow` (or
`modify` once the pool is back) within the overload limit, the pool back to N live workers, and
/metrics saying what happened. Recovery times (fault -> GET /readyz 200 again) go to the report.

A worker that writes garbage, closes its pipe or answers the wrong request is covered at the
pool level with fake workers (tests/test_pool.py::test_broken_replies_fail_the_request_and_replace_the_worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hookd.affinity import session_key, slot_for
from hookd.metrics import Metrics
from hookd.pool import BACKOFF_FIRST_S, STABLE_AFTER_S, WorkerPool
from hookd.settings import Settings
from tests import client, fake_workers, fixtures, report
from tests.hookd_process import Hookd

POOL_SIZE = 2
QUEUE_TIMEOUT_S = 2.0  # hookd's default --queue-timeout
MAX_COMPRESS_S = 2.0  # --max-compress for the hang test
# Generous: the machine has two cores and is shared, and the client runs on them too.
MARGIN_S = 1.0
RECOVERY_TIMEOUT_S = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- requests --------------------------------------------------------------------------------


def session_for_slot(slot: int, prefix: str) -> str:
    """A session id that the pool routes to `slot`."""
    for i in itertools.count():
        candidate = f"{prefix}-{i}"
        if slot_for(session_key(candidate, []), POOL_SIZE) == slot:
            return candidate
    raise AssertionError("unreachable")


def big_call(session_id: str, nonce: str) -> bytes:
    return orjson.dumps(_call(fixtures.big_json_conversation(nonce), session_id))


def small_call(session_id: str, nonce: str) -> bytes:
    """A short new conversation with a log to compress: tens of milliseconds for a worker."""
    log = "\n".join(f"2026-11-22 10:00:{i % 60:02d} INFO {nonce} request {i} ok in {i % 7} ms" for i in range(400))
    messages = [
        {"role": "user", "content": f"show the log ({nonce})"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": log}]},
        {"role": "assistant", "content": "Looking."},
        {"role": "user", "content": "and?"},
    ]
    return orjson.dumps(_call(messages, session_id))


def _call(messages: list[dict[str, Any]], session_id: str) -> dict[str, Any]:
    model = "claude-sonnet-4-5-20250929"
    return {
        "metadata": {"provider": "anthropic", "model": model, "session_id": session_id},
        "request_body": {"model": model, "max_tokens": 4096, "messages": messages},
    }


@dataclass
class Sent:
    """One request as the client saw it."""

    started: float
    finished: float
    status: int | str
    action: str | None

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def within(self, limit: float) -> bool:
        return self.status == 200 and self.action in ("allow", "modify") and self.seconds <= limit


async def send(session: aiohttp.ClientSession, url: str, call: bytes) -> Sent:
    started = time.monotonic()
    try:
        status, _, answer = await client.post(session, url, call)
        action = answer.get("action") if isinstance(answer, dict) else None
    except (aiohttp.ClientError, ValueError) as exc:
        status, action = type(exc).__name__, None
    return Sent(started, time.monotonic(), status, action)


# -- processes -------------------------------------------------------------------------------


def worker_children(parent: int) -> set[int]:
    """Live worker processes of `parent`: multiprocessing's spawned children, not its resource
    tracker (zombies have an empty command line and drop out)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if (
                int(stat.rsplit(")", 1)[1].split()[1]) == parent
                and b"spawn_main" in Path(entry.path, "cmdline").read_bytes()
            ):
                found.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def age_s(pid: int) -> float:
    started_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started_ticks / CLK_TCK


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- watching the server ---------------------------------------------------------------------


class Watch:
    """The server seen from outside, without blocking the event loop the requests run on."""

    def __init__(self, server: Hookd, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.server.url + "readyz") as response:
            return response.status, await response.json()

    async def pids(self) -> dict[int, int]:
        """Slot -> pid of each warm worker."""
        _, body = await self.readyz()
        return {w["slot"]: w["pid"] for w in body["workers"] if "pid" in w}

    async def metrics(self) -> str:
        async with self.session.get(self.server.url + "metrics") as response:
            return await response.text()

    async def counter(self, name: str, **labels: str) -> float:
        return report.metric(await self.metrics(), name, **labels)

    async def wait_busy(self, slot: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = await self.readyz()
            if body["workers"][slot]["state"] == "busy":
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"worker {slot} never became busy")

    async def wait_recovered(self, gone: set[int], timeout: float = RECOVERY_TIMEOUT_S) -> list[int]:
        """Wait for /readyz 200 with POOL_SIZE distinct pids, none of them a killed one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = await self.readyz()
            pids = [w.get("pid") for w in body["workers"]]
            if status == 200 and len(set(pids)) == POOL_SIZE and not set(pids) & gone:
                return [int(p) for p in pids if p is not None]
            await asyncio.sleep(0.05)
        raise AssertionError(f"pool did not recover in {timeout} s: {body}")


async def wait_stable(pids: list[int]) -> None:
    """Let the workers outlive hookd's crash-loop window, so one kill is one plain restart
    (no back-off): the recovery time then measures respawn and warm-up only."""
    wait = max(STABLE_AFTER_S + 0.5 - age_s(pid) for pid in pids)
    if wait > 0:
        await asyncio.sleep(wait)


@contextlib.contextmanager
def started(tmp_path: Path, *flags: str) -> Iterator[Hookd]:
    server = Hookd(*flags, state_dir=tmp_path / "state", pool_size=POOL_SIZE)
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def watching(server: Hookd) -> AsyncIterator[Watch]:
    async with aiohttp.ClientSession() as session:
        yield Watch(server, session)


def outside(sent: list[Sent], limit: float) -> list[Sent]:
    return [s for s in sent if not s.within(limit)]


# -- the faults ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sigkill_of_a_busy_worker(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with started(tmp_path) as server:
        server.wait_ready()
        async with watching(server) as watch:
            before = await watch.pids()
            await wait_stable(list(before.values()))
            victim = before[0]
            busy = asyncio.create_task(send(watch.session, server.url, big_call(session_for_slot(0, "kill"), "a")))
            await watch.wait_busy(0)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # New conversations for both slots while slot 0 is down: they go to slot 1.
            others = await asyncio.gather(
                *(send(watch.session, server.url, small_call(session_for_slot(s, f"by{s}"), f"by{s}")) for s in (0, 1))
            )
            hit = await busy
            after = await watch.wait_recovered(gone={victim})
            recovery_s = time.monotonic() - killed_at
            again = await send(watch.session, server.url, small_call(session_for_slot(0, "again"), "again"))
            text = await watch.metrics()

    restarts = report.metric(text, "hookd_worker_restarts_total")
    errors = report.metric(text, "hookd_outcomes_total", outcome="allow(error)")
    # The killed worker's own request is answered as soon as the pool sees the worker die.
    late = outside(others, QUEUE_TIMEOUT_S + MARGIN_S) + outside([hit], killed_at - hit.started + MARGIN_S)
    report.record(
        request,
        requests_sent=len(others) + 2,
        faults_injected=1,
        answers_outside_contract=len(late + outside([again], QUEUE_TIMEOUT_S + MARGIN_S)),
        recovery_s=round(recovery_s, 2),
        killed_request_answered_after_kill_s=round(hit.finished - killed_at, 3),
        worker_restarts=restarts,
        allow_error=errors,
    )
    assert (hit.status, hit.action) == (200, "allow")
    assert late == []
    assert before[1] in after and victim not in after
    assert (again.status, again.action) == (200, "modify")
    assert (restarts, errors) == (1, 1)


@pytest.mark.slow
async def test_sigstop_hangs_a_busy_worker_past_max_compress(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with started(tmp_path, "--max-compress", str(MAX_COMPRESS_S)) as server:
        server.wait_ready()
        async with watching(server) as watch:
            before = await watch.pids()
            await wait_stable(list(before.values()))
            victim = before[0]
            session = session_for_slot(0, "hang")
            try:
                hung = asyncio.create_task(send(watch.session, server.url, big_call(session, "h")))
                await watch.wait_busy(0)
                stopped_at = time.monotonic()
                os.kill(victim, signal.SIGSTOP)
                # The same session again while its worker hangs: it waits --affinity-wait for
                # its own worker, then spills to the other one.
                during = [await send(watch.session, server.url, small_call(session, f"during{i}")) for i in range(3)]
                hit = await hung
                after = await watch.wait_recovered(gone={victim})
                recovery_s = time.monotonic() - stopped_at
            finally:
                # Only if hookd did not kill it: let it run on and exit with its socket closed.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            again = await send(watch.session, server.url, small_call(session, "again"))
            text = await watch.metrics()

    restarts = report.metric(text, "hookd_worker_restarts_total")
    errors = report.metric(text, "hookd_outcomes_total", outcome="allow(error)")
    # The hung request is cut off by --max-compress (the worker took it at once).
    late = outside(during, QUEUE_TIMEOUT_S + MARGIN_S) + outside([hit], MAX_COMPRESS_S + MARGIN_S)
    report.record(
        request,
        requests_sent=len(during) + 2,
        faults_injected=1,
        answers_outside_contract=len(late + outside([again], QUEUE_TIMEOUT_S + MARGIN_S)),
        max_compress_s=MAX_COMPRESS_S,
        hung_request_answered_s=round(hit.seconds, 3),
        during_hang_latency=report.latency_ms([s.seconds for s in during]),
        recovery_s=round(recovery_s, 2),
        worker_restarts=restarts,
        allow_error=errors,
    )
    assert (hit.status, hit.action) == (200, "allow")
    assert late == []
    assert not alive(victim)
    assert before[1] in after and victim not in after
    assert (again.status, again.action) == (200, "modify")
    assert (restarts, errors) == (1, 1)


@pytest.mark.slow
async def test_workers_killed_during_warmup(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with started(tmp_path) as server:
        deadline = time.monotonic() + 30
        while len(first := worker_children(server.proc.pid)) < POOL_SIZE:
            assert time.monotonic() < deadline, "workers were never spawned"
            await asyncio.sleep(0.01)
        async with watching(server) as watch:
            status_before_kill, _ = await watch.readyz()
            killed_at = time.monotonic()
            for pid in first:
                os.kill(pid, signal.SIGKILL)
            sent = await asyncio.gather(
                *(send(watch.session, server.url, small_call(f"warm-{i}", f"warm{i}")) for i in range(3))
            )
            after = await watch.wait_recovered(gone=first)
            recovery_s = time.monotonic() - killed_at
            again = await send(watch.session, server.url, small_call("after-warmup", "again"))
            text = await watch.metrics()

    overloads = report.metric(text, "hookd_outcomes_total", outcome="allow(overload)")
    late = outside(sent, QUEUE_TIMEOUT_S + MARGIN_S)
    report.record(
        request,
        requests_sent=len(sent) + 1,
        faults_injected=len(first),
        answers_outside_contract=len(late + outside([again], QUEUE_TIMEOUT_S + MARGIN_S)),
        latency_without_workers=report.latency_ms([s.seconds for s in sent]),
        allow_overload=overloads,
        recovery_s=round(recovery_s, 2),
        worker_restarts=report.metric(text, "hookd_worker_restarts_total"),
    )
    assert status_before_kill == 503, "the workers were warm before they were killed"
    assert late == []
    assert overloads == sum(s.action == "allow" for s in sent) >= 1
    assert len(set(after)) == POOL_SIZE
    assert (again.status, again.action) == (200, "modify")


async def test_a_worker_lost_during_warmup_counts_as_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marks = tmp_path / "marks"
    monkeypatch.setenv("HOOKD_TEST_MARKS", str(marks))
    pool = WorkerPool(Settings(pool_size=1, warmup_timeout=20), Metrics(), target=fake_workers.fail_warmup)
    await pool.start()
    try:
        # Starts at 0, 0.5 and 1.5 s: the back-off schedule.
        await asyncio.sleep(3 * BACKOFF_FIRST_S + 1.0)
        starts = len(marks.read_text().split())
        restarts = report.metric(pool.metrics.render().decode(), "hookd_worker_restarts_total")
    finally:
        await pool.stop(grace=1.0)
    assert starts >= 2
    assert restarts >= starts - 1


@pytest.mark.slow
async def test_repeated_crashes_of_one_slot_are_backed_off(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    kill_window_s = 8.0
    with started(tmp_path) as server:
        server.wait_ready()
        async with watching(server) as watch:
            before = await watch.pids()
            survivor = before[1]
            spawned: list[tuple[float, int]] = []
            killed: set[int] = set()

            async def crash_loop() -> float:
                """Kill slot 0's worker, then every process spawned to replace it, as soon as it
                appears (while it warms up), for the whole window."""
                os.kill(before[0], signal.SIGKILL)
                killed.add(before[0])
                last_kill = begun = time.monotonic()
                while time.monotonic() - begun < kill_window_s:
                    for pid in worker_children(server.proc.pid) - killed - {survivor}:
                        spawned.append((time.monotonic() - begun, pid))
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                        last_kill = time.monotonic()
                    await asyncio.sleep(0.01)
                return last_kill

            async def traffic() -> list[Sent]:
                """New conversations for the crashing slot all along: the survivor serves them."""
                sent = []
                for i in range(int(kill_window_s / 0.5)):
                    call = small_call(session_for_slot(0, f"loop{i}"), f"loop{i}")
                    sent.append(await send(watch.session, server.url, call))
                    await asyncio.sleep(0.5)
                return sent

            last_kill, sent = await asyncio.gather(crash_loop(), traffic())
            after = await watch.wait_recovered(gone=killed)
            recovery_s = time.monotonic() - last_kill
            text = await watch.metrics()

    times = [at for at, _ in spawned]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    restarts = report.metric(text, "hookd_worker_restarts_total")
    late = outside(sent, QUEUE_TIMEOUT_S + MARGIN_S)
    report.record(
        request,
        requests_sent=len(sent),
        faults_injected=len(killed),
        answers_outside_contract=len(late),
        kill_window_s=kill_window_s,
        respawns_in_window=len(spawned),
        respawn_gaps_s=[round(g, 2) for g in gaps],
        latency_during_crash_loop=report.latency_ms([s.seconds for s in sent]),
        recovery_after_last_kill_s=round(recovery_s, 2),
        worker_restarts=restarts,
    )
    # Back-off doubles from 0.5 s: 4 or 5 respawns fit in 8 s. Without it, a respawn would
    # follow every kill within a few tens of milliseconds: hundreds in the window.
    assert 2 <= len(spawned) <= 6, spawned
    assert all(later >= earlier - 0.25 for earlier, later in itertools.pairwise(gaps)), gaps
    assert late == []
    assert survivor in after and not set(after) & killed
    assert restarts >= 1


@pytest.mark.slow
async def test_all_workers_killed_at_once(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with started(tmp_path) as server:
        server.wait_ready()
        async with watching(server) as watch:
            before = await watch.pids()
            await wait_stable(list(before.values()))
            killed_at = time.monotonic()
            for pid in before.values():
                os.kill(pid, signal.SIGKILL)
            sent = await asyncio.gather(
                *(send(watch.session, server.url, small_call(f"dead-{i}", f"dead{i}")) for i in range(4))
            )
            after = await watch.wait_recovered(gone=set(before.values()))
            recovery_s = time.monotonic() - killed_at
            again = await send(watch.session, server.url, small_call("after-all-dead", "again"))
            text = await watch.metrics()

    errors = report.metric(text, "hookd_outcomes_total", outcome="allow(error)")
    overloads = report.metric(text, "hookd_outcomes_total", outcome="allow(overload)")
    restarts = report.metric(text, "hookd_worker_restarts_total")
    late = outside(sent, QUEUE_TIMEOUT_S + MARGIN_S)
    report.record(
        request,
        requests_sent=len(sent) + 1,
        faults_injected=POOL_SIZE,
        answers_outside_contract=len(late + outside([again], QUEUE_TIMEOUT_S + MARGIN_S)),
        latency_without_workers=report.latency_ms([s.seconds for s in sent]),
        allow_error=errors,
        allow_overload=overloads,
        recovery_s=round(recovery_s, 2),
        worker_restarts=restarts,
    )
    assert late == []
    assert len(set(after)) == POOL_SIZE
    assert (again.status, again.action) == (200, "modify")
    # A request may still reach a worker the pool has not yet seen die (allow(error)); the rest
    # find no worker at all (allow(overload)).
    assert errors + overloads == sum(s.action == "allow" for s in sent) == len(sent)
    assert restarts == POOL_SIZE
