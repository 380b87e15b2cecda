"""The arbiter of worker processes: spawn, warm, route, time out, reap and respawn.

Nothing else touches a worker process. Each slot has one supervisor task that keeps a warm
process in it; requests borrow a worker through `compress()`, one request in flight per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import orjson

from hookd.affinity import slot_for
from hookd.compressor import CompressorError, Job, Overloaded, Result
from hookd.metrics import Metrics
from hookd.settings import Settings
from worker import frames
from worker.main import run as worker_main

log = logging.getLogger("hookd.pool")

# Spawn, not fork: headroom keeps lazily-built pipelines and caches in module globals, which must
# be created inside the worker that uses them, and forking a process running an event loop and
# threads is unsafe anyway.
SPAWN = multiprocessing.get_context("spawn")

STARTING, IDLE, BUSY, DEAD = "starting", "idle", "busy", "dead"
# A worker that dies sooner than this after warming up counts as a crash loop and backs off.
STABLE_AFTER_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Sessions a worker remembers having served, to report `cold`; bounded, newest kept.
SEEN_KEYS = 4096
STOP_GRACE_S = 5.0
# What a worker reports about itself when it is warm, shown by /readyz and /config.
WORKER_FACTS = (
    "pid",
    "headroom_version",
    "warmup_ms",
    "savings_profiles",
    "ml_text_compression",
    "ml_reason",
    "ml_provider",
    "ml_threads",
    "ml_budget_s",
    "ml_load_ms",
)


class WorkerFailed(CompressorError):
    """The worker died, hung or sent garbage; it has been killed and will be respawned."""


@dataclass
class Worker:
    slot: int
    state: str = STARTING
    process: BaseProcess | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    exited: asyncio.Future[None] | None = None
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    crashes: int = 0
    last_used: float = 0.0
    next_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        target: Callable[..., None] = worker_main,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.target = target
        self.workers = [Worker(slot) for slot in range(settings.pool_size)]
        self._cond = asyncio.Condition()
        self._supervisors: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[Result]] = set()
        self._stopping = False
        self._waiting = 0
        metrics.pool_size.set(settings.pool_size)
        metrics.pool_busy.set_function(lambda: sum(w.state == BUSY for w in self.workers))
        metrics.pool_live.set_function(lambda: sum(w.state in (IDLE, BUSY) for w in self.workers))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._supervisors = [asyncio.create_task(self._supervise(w)) for w in self.workers]

    def ready(self) -> bool:
        return all(w.state in (IDLE, BUSY) for w in self.workers)

    async def wait_ready(self, timeout: float) -> bool:
        async with self._cond:
            return await self._wait_until(self.ready, timeout)

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"slot": w.slot, "state": w.state, **w.info} for w in self.workers]

    async def stop(self, grace: float) -> None:
        """Give calls in flight up to `grace` seconds to finish, then end the workers."""
        self._stopping = True
        if self._calls:
            await asyncio.wait(self._calls, timeout=max(0.0, grace))
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(self._end(w) for w in self.workers))

    async def _supervise(self, worker: Worker) -> None:
        while not self._stopping:
            delay = self._backoff(worker)
            if delay:
                log.warning(
                    "worker %d: restarting in %.1f s after %d quick failures", worker.slot, delay, worker.crashes
                )
                await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                await self._spawn(worker)
            except (OSError, TimeoutError, frames.FrameError, asyncio.IncompleteReadError) as exc:
                log.error("worker %d: failed to start: %s", worker.slot, exc or type(exc).__name__)
                worker.crashes += 1
                if not self._stopping:
                    self.metrics.worker_restarts.inc()
                await self._end(worker)
                continue
            async with self._cond:
                worker.state = IDLE
                self._cond.notify_all()
            assert worker.exited is not None
            await worker.exited
            lived = time.monotonic() - started
            worker.crashes = 0 if lived >= STABLE_AFTER_S else worker.crashes + 1
            if not self._stopping:
                self.metrics.worker_restarts.inc()
                log.warning("worker %d: exited (code %s) after %.1f s", worker.slot, _exit_code(worker), lived)
            await self._end(worker)

    @staticmethod
    def _backoff(worker: Worker) -> float:
        if worker.crashes == 0:
            return 0.0
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (worker.crashes - 1))

    async def _spawn(self, worker: Worker) -> None:
        worker.state = STARTING
        worker.seen.clear()
        ours, theirs = socket.socketpair()
        process = SPAWN.Process(
            target=self.target,
            args=(theirs, worker.slot, self.settings.worker_options()),
            name=f"hookd-worker-{worker.slot}",
        )
        try:
            # Process.start() forks and pickles; keep that off the event loop.
            await asyncio.to_thread(process.start)
        finally:
            theirs.close()
        worker.process = process
        loop = asyncio.get_running_loop()
        worker.exited = loop.create_future()
        loop.add_reader(process.sentinel, _mark_exited, worker.exited)
        worker.reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        began = time.monotonic()
        hello = await asyncio.wait_for(self._read(worker), self.settings.warmup_timeout)
        if not hello.get("ready"):
            raise frames.FrameError(f"worker said {hello.get('error', 'something other than ready')}")
        worker.info = {k: hello[k] for k in WORKER_FACTS if k in hello}
        log.info("worker %d: pid %s warm in %.1f s", worker.slot, process.pid, time.monotonic() - began)

    async def _end(self, worker: Worker) -> None:
        worker.state = DEAD
        process = worker.process
        if worker.writer is not None:
            worker.writer.close()
        if process is not None:
            asyncio.get_running_loop().remove_reader(process.sentinel)
            # A closed socket tells the worker to exit; one that does not is killed.
            await asyncio.to_thread(process.join, STOP_GRACE_S if self._stopping else 0.2)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, STOP_GRACE_S)
            process.close()
        worker.process = worker.reader = worker.writer = worker.exited = None
        worker.info = {}

    # -- routing ---------------------------------------------------------------------------

    async def compress(self, job: Job) -> Result:
        loop = asyncio.get_running_loop()
        queued = loop.time()
        worker, placement = await self._acquire(job.key, job.affinity_wait)
        wait_ms = (loop.time() - queued) * 1000
        cold = job.key not in worker.seen
        self._record_placement(placement, cold, wait_ms)
        call = asyncio.create_task(self._call(worker, job))
        self._calls.add(call)
        call.add_done_callback(self._call_done)
        # Shielded: if Aperture hangs up, the worker still finishes (its cache stays warm) and
        # only the answer is dropped; the worker is released when the call really ends.
        result = await asyncio.shield(call)
        result.wait_ms, result.slot, result.cold, result.placement = wait_ms, worker.slot, cold, placement
        return result

    async def compress_idle(self, job: Job) -> Result | None:
        async with self._cond:
            home = self.workers[slot_for(job.key, len(self.workers))] if self.settings.affinity else None
            if self._waiting or self._stopping:
                return None
            worker = home if home is not None and home.state == IDLE else None
            if worker is None and home is None and self._any_idle():
                worker = self._pick(None, job.key)
            if worker is None:
                return None
            worker.state = BUSY
            worker.last_used = asyncio.get_running_loop().time()
        call = asyncio.create_task(self._call(worker, job))
        self._calls.add(call)
        call.add_done_callback(self._call_done)
        return await asyncio.shield(call)

    def _call_done(self, task: asyncio.Task[Result]) -> None:
        self._calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here so an abandoned call's failure is not reported twice

    def _record_placement(self, placement: str, cold: bool, wait_ms: float) -> None:
        self.metrics.queue_wait.observe(wait_ms / 1000)
        if placement == "hit":
            self.metrics.affinity_hits.inc()
        elif placement == "spill":
            self.metrics.affinity_spills.inc()
        if cold:
            self.metrics.cold_starts.inc()

    async def _acquire(self, key: bytes, affinity_wait: float) -> tuple[Worker, str]:
        loop = asyncio.get_running_loop()
        if self._waiting >= self.settings.queue_per_worker * len(self.workers):
            self.metrics.overloads.inc()
            raise Overloaded(f"{self._waiting} requests already waiting for a worker")
        deadline = loop.time() + self.settings.queue_timeout
        home = self.workers[slot_for(key, len(self.workers))] if self.settings.affinity else None
        self._waiting += 1
        try:
            return await self._wait_for_worker(home, key, affinity_wait, deadline)
        finally:
            self._waiting -= 1

    async def _wait_for_worker(
        self, home: Worker | None, key: bytes, affinity_wait: float, deadline: float
    ) -> tuple[Worker, str]:
        loop = asyncio.get_running_loop()
        async with self._cond:
            if home is not None and home.state == BUSY:
                # Its own worker is usually free again within a warm turn; another one would
                # have to recompress the whole conversation cold.
                wait = min(affinity_wait, deadline - loop.time())
                await self._wait_until(lambda: home.state != BUSY, wait)
            if not await self._wait_until(self._any_idle, deadline - loop.time()):
                self.metrics.overloads.inc()
                raise Overloaded(f"no worker free within {self.settings.queue_timeout} s")
            worker = self._pick(home, key)
            worker.state = BUSY
            worker.last_used = loop.time()
        if home is None:
            return worker, "any"
        return worker, "hit" if worker is home else "spill"

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait on the condition (held by the caller) until predicate() or the timeout."""
        if predicate():
            return True
        if timeout <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
        return predicate()

    def _any_idle(self) -> bool:
        return any(w.state == IDLE for w in self.workers)

    def _pick(self, home: Worker | None, key: bytes) -> Worker:
        if home is not None and home.state == IDLE:
            return home
        idle = [w for w in self.workers if w.state == IDLE]
        # Prefer a worker that has seen this conversation (still warm for it), then the one
        # that has waited longest.
        return min(idle, key=lambda w: (key not in w.seen, w.last_used))

    async def _release(self, worker: Worker) -> None:
        async with self._cond:
            if worker.state == BUSY:
                worker.state = IDLE
            self._cond.notify_all()

    # -- one call --------------------------------------------------------------------------

    async def _call(self, worker: Worker, job: Job) -> Result:
        worker.next_id += 1
        request_id = worker.next_id
        try:
            frame = {
                "id": request_id,
                "model": job.model,
                "messages": job.messages,
                "knobs": job.knobs,
                "frozen": job.frozen,
                "strong": job.strong,
                "offset": job.offset,
                "session": job.key.hex() if job.dedup else "",
                "count": job.count,
            }
            payload = orjson.dumps(frame)
        except orjson.JSONEncodeError as exc:
            # Nesting orjson reads but will not write; the worker never saw it and stays.
            await self._release(worker)
            raise CompressorError(f"messages cannot be framed: {exc}") from None
        try:
            async with asyncio.timeout(self.settings.max_compress):
                assert worker.writer is not None
                worker.writer.write(frames.header_for(payload))
                worker.writer.write(payload)
                await worker.writer.drain()
                reply = await self._read(worker)
            result = _result_from(reply, request_id, job.messages)
        except TimeoutError:
            self._kill(worker, "ran past --max-compress")
            raise WorkerFailed(f"compression ran past {self.settings.max_compress} s") from None
        except (OSError, asyncio.IncompleteReadError, frames.FrameError, ValueError, TypeError, KeyError) as exc:
            self._kill(worker, f"broken exchange: {type(exc).__name__}")
            raise WorkerFailed(f"worker {worker.slot} failed: {exc or type(exc).__name__}") from None
        finally:
            await self._release(worker)
        _remember(worker.seen, job.key)
        if self.settings.worker_max_rss_mb and result.rss_mb > self.settings.worker_max_rss_mb:
            await self._retire(worker, result.rss_mb)
        return result

    async def _retire(self, worker: Worker, rss_mb: float) -> None:
        """Replace a worker that has grown too big, once it is idle: closing its socket makes it
        exit on its own, and its supervisor spawns a fresh one."""
        async with self._cond:
            if worker.state != IDLE:
                return
            worker.state = DEAD
        log.info("worker %d: recycling it at %.0f MB resident", worker.slot, rss_mb)
        self.metrics.worker_recycles.inc()
        if worker.writer is not None:
            worker.writer.close()

    async def _read(self, worker: Worker) -> dict[str, Any]:
        assert worker.reader is not None
        return await frames.read(worker.reader)

    def _kill(self, worker: Worker, why: str) -> None:
        """Mark the worker dead and kill it; its supervisor reaps it and spawns a new one."""
        log.warning("worker %d: killing it: %s", worker.slot, why)
        worker.state = DEAD
        if worker.process is not None and worker.process.is_alive():
            worker.process.kill()


def _result_from(reply: dict[str, Any], request_id: int, messages: list[Any]) -> Result:
    if reply.get("id") != request_id:
        raise frames.FrameError(f"reply for request {reply.get('id')!r}, expected {request_id}")
    if not reply.get("ok"):
        # headroom raised inside the worker; the worker itself is fine and stays.
        raise CompressorError(str(reply.get("error", "worker reported a failure")))
    return Result(
        messages=_merge(messages, reply),
        tokens_before=int(reply["tokens_before"]),
        tokens_after=int(reply["tokens_after"]),
        model_limit=int(reply["model_limit"]),
        worker_ms=float(reply["worker_ms"]),
        markers_removed=int(reply.get("markers_removed", 0)),
        rss_mb=float(reply.get("rss_mb", 0.0)),
        counts={int(i): (int(before), int(after)) for i, before, after in reply.get("counts", [])},
    )


def _merge(messages: list[Any], reply: dict[str, Any]) -> list[Any]:
    """The worker sends back only the messages it changed (or all of them if it changed how many
    there are, which validation will then refuse)."""
    if "messages" in reply:
        return reply["messages"]
    merged = list(messages)
    for index, message in reply["changed"]:
        if not isinstance(index, int) or not 0 <= index < len(merged):
            raise frames.FrameError(f"reply changes message {index!r} of {len(merged)}")
        merged[index] = message
    return merged


def _remember(seen: OrderedDict[bytes, None], key: bytes) -> None:
    seen[key] = None
    seen.move_to_end(key)
    while len(seen) > SEEN_KEYS:
        seen.popitem(last=False)


def _mark_exited(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _exit_code(worker: Worker) -> int | None:
    return worker.process.exitcode if worker.process is not None else None
