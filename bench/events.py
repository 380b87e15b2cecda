"""Events under load: does a flood of `entire_request` events slow the hook or grow hookd?

    python -m bench.events [--quick] [--minutes 5] [--events-per-minute 10000] [--hook-rps 4] [--rounds N]
                           [--events-on own-listener|hook-listener] [--out DIR]

A real hookd (`tests.hookd_process`, two workers; by default with `--events-listen`, events taken
by a process of their own, `--events-on hook-listener` for /events on the hook's own listener),
warmed up with hook traffic and events, gets the same hook traffic twice a round, open loop at
`--hook-rps`: corpus sessions turn by turn
(fixtures built from this machine's command output without the corpus), each pass under new
session ids. One run of a round has no events, the other adds `--events-per-minute` events
(rounds alternate which comes first), paced evenly: the event for every hook call a quarter of a
second after it was sent (matched), the rest for requests hookd never saw (unmatched), in every
shape (`tests.aperture_events`; streamed ones with a few hundred text deltas, as long answers
have).
Events go over a few keep-alive connections from a raw HTTP client in a process of its own, as
they come from Aperture and not from the client that times the hook calls; the sender still costs
the machine as little as possible, since hookd and the sender share its CPUs.

It reports, per run, hook latency (client-side, p50/p90/p99), events sent and counted, the
front end's and the events process's resident memory over the run (sampled every few seconds;
workers are separate processes and not counted) and CPU time, and the most requests ever waiting
for their event (`hookd_usage_pending_requests`). Pass: p99 with events, pooled over the rounds,
within 1.1x of without; memory flat; the pending count bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from hookd.events import BACKLOG_DELAY_S
from hookd.prices import Usage
from tests import aperture_events, client, corpus, fixtures
from tests.hookd_process import Hookd, free_port

PLACEHOLDER = b"REQUEST-ID-PLACEHOLDER"
CONNECTIONS = 4
STREAM_DELTAS = 300
ANSWER_WORDS = 400
EVENT_MIX = (
    ("anthropic", True),
    ("openai", True),
    ("estimated-cost", False),
    ("anthropic", True),
    ("anthropic-stream", False),
    ("anthropic", True),
    ("openai", True),
    ("estimated-cost", False),
    ("anthropic", True),
    ("openai-stream", False),
)
RSS_EVERY_S = 5.0
SENDER_START_S = 3.0  # time for the sender's process to start before the run begins
MATCH_AFTER_S = 0.25  # a hook call's event is sent this long after the call was
DRAIN_S = 5.0
USERS = 50
MIB = 1024 * 1024
LATENCY_RATIO = 1.1
# Memory a run may add to the front end and still count as flat: allocator noise, not growth.
RSS_SLACK_MB = 24.0


@dataclass
class Run:
    name: str
    seconds: float
    hook_ms: list[float] = field(default_factory=list)
    hook_errors: int = 0
    events_sent: int = 0
    events_failed: int = 0
    events_behind_s: float = 0.0  # how late the sender fell behind its schedule, at most
    rss_mb: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # the front end's CPU time over the run
    events_rss_mb: list[float] = field(default_factory=list)  # the events process's, when there is one
    events_cpu_s: float = 0.0
    pending_max: float = 0.0
    counted: float = 0.0

    def summary(self) -> dict[str, Any]:
        latency = sorted(self.hook_ms)
        return {
            "run": self.name,
            "seconds": self.seconds,
            "hook_requests": len(latency),
            "hook_errors": self.hook_errors,
            "hook_p50_ms": _rank(latency, 0.5),
            "hook_p90_ms": _rank(latency, 0.9),
            "hook_p99_ms": _rank(latency, 0.99),
            "events_sent": self.events_sent,
            "events_failed": self.events_failed,
            "events_per_minute": self.events_sent / self.seconds * 60,
            "events_behind_s": self.events_behind_s,
            "events_counted": self.counted,
            "front_end_cpu_s": self.cpu_s,
            "rss_first_mb": self.rss_mb[0] if self.rss_mb else 0.0,
            "rss_last_mb": self.rss_mb[-1] if self.rss_mb else 0.0,
            "rss_max_mb": max(self.rss_mb, default=0.0),
            "events_process_cpu_s": self.events_cpu_s,
            "events_process_rss_first_mb": self.events_rss_mb[0] if self.events_rss_mb else 0.0,
            "events_process_rss_last_mb": self.events_rss_mb[-1] if self.events_rss_mb else 0.0,
            "pending_max": self.pending_max,
        }


def _rank(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))] if values else 0.0


def hook_traffic() -> list[dict[str, Any]]:
    """One pass of hook calls: corpus sessions turn by turn, else conversations built here."""
    if corpus.available():
        sessions = corpus.sessions({"cc-reliability-python-to-rust-port", "cc-spotter-fa812bfe-s1"})
        return [call for session in sessions for call in corpus.hook_calls(session)]
    calls = []
    for provider, messages in (("anthropic", fixtures.anthropic_session()), ("openai", fixtures.openai_session())):
        for end in range(2, len(messages) + 1, 2):
            calls.append(fixtures.hook_call(messages[:end], provider, session_id=provider))
    return calls


def event_templates() -> list[bytes]:
    """Encoded events, one per user, with a placeholder where the request id goes: mostly what
    the README's grant sends (the response body, Aperture's estimate), and one in five a stream's
    events, for an operator who also sends `raw_responses`."""
    bill = Usage(input=1_500, cache_read=60_000, cache_write=3_000)
    answer = " ".join(f"word{i}" for i in range(ANSWER_WORDS))
    templates = []
    for user, (shape, with_cost) in zip(range(USERS), itertools.cycle(EVENT_MIX), strict=False):
        provider = "openai" if shape.startswith("openai") else "anthropic"
        document = aperture_events.event(
            shape, PLACEHOLDER.decode(), bill, provider, user=f"user{user}@example.com", estimated_cost=with_cost
        )
        body = document.get("response_body")
        if body and provider == "anthropic":
            body["content"][0]["text"] = answer
        elif body:
            body["choices"][0]["message"]["content"] = answer
        stream = document.get("raw_responses")
        if stream:
            # A long answer streams hundreds of deltas; the usage sits at both ends.
            stream[2:2] = [stream[3]] * STREAM_DELTAS
        templates.append(orjson.dumps(document))
    return templates


class EventSender:
    """A minimal HTTP/1.1 client over keep-alive connections: one request in flight on each."""

    def __init__(self, port: int, templates: list[bytes], run: Run) -> None:
        self.port = port
        self.templates = templates
        self.run = run
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.busy = 0  # connections waiting for an answer

    def request(self, request_id: str, shape: int) -> bytes:
        body = self.templates[shape % len(self.templates)].replace(PLACEHOLDER, request_id.encode())
        head = "POST /events HTTP/1.1\r\nHost: hookd\r\nContent-Type: application/json\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def connection(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.run.events_failed += 1
                await asyncio.sleep(0.1)
                continue
            try:
                while True:
                    raw = await self.queue.get()
                    self.busy += 1
                    writer.write(raw)
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(_content_length(head))
                    self.busy -= 1
                    self.run.events_sent += 1
                    self.run.events_failed += not head.startswith(b"HTTP/1.1 200")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.run.events_failed += 1
            finally:
                writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@dataclass(frozen=True)
class Target:
    """The hookd under test: its hook URL, the port events go to, and its processes."""

    url: str
    events_port: int
    front: psutil.Process
    events_process: psutil.Process | None  # with --events-listen

    def processes(self) -> list[psutil.Process]:
        return [self.front, *([self.events_process] if self.events_process else [])]


async def drive(target: Target, run: Run, calls: list[dict[str, Any]], args: argparse.Namespace, events: bool) -> None:
    started = time.monotonic() + SENDER_START_S
    stop = started + run.seconds
    url = target.url
    sampler = asyncio.create_task(sample(target, run, stop))
    context = multiprocessing.get_context("spawn")
    results, sender_end = context.Pipe(duplex=False)
    schedule = Schedule(target.events_port, run.name, started, run.seconds, args.events_per_minute, args.hook_rps)
    sender = context.Process(target=send_events, args=(schedule, sender_end), daemon=True) if events else None
    if sender:
        sender.start()
    # Only the sender holds its end now: if it dies, `recv` below says so instead of waiting.
    sender_end.close()
    await asyncio.sleep(max(0.0, started - time.monotonic()))
    cpu = [_cpu_s(p) for p in target.processes()]
    async with aiohttp.ClientSession() as http:
        await hook_load(http, url, calls, args.hook_rps, started, stop, run)
    _sample_rss(target, run)
    used = [_cpu_s(p) - before for p, before in zip(target.processes(), cpu, strict=True)]
    run.cpu_s, run.events_cpu_s = used[0], sum(used[1:])
    if sender:
        run.events_sent, run.events_failed, run.events_behind_s = await asyncio.to_thread(results.recv)
        await asyncio.to_thread(sender.join)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler


async def hook_load(
    http: aiohttp.ClientSession,
    url: str,
    calls: list[dict[str, Any]],
    rps: float,
    started: float,
    stop: float,
    run: Run,
) -> None:
    """Open loop: a hook call every 1/rps seconds, each timed from send to the last byte read."""
    in_flight: set[asyncio.Task[None]] = set()
    for number in itertools.count():
        due = started + number / rps
        if due >= stop:
            break
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        index = number % len(calls)
        # Every pass is new conversations to hookd, as in production.
        metadata = {**calls[index]["metadata"], "request_id": request_id(run.name, number)}
        metadata["session_id"] = f"{run.name}-{number // len(calls)}-{metadata.get('session_id')}"
        call = {**calls[index], "metadata": metadata}
        task = asyncio.create_task(one_hook_call(http, url, call, run))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


def request_id(run_name: str, number: int) -> str:
    return f"{run_name}-{number}"


async def one_hook_call(http: aiohttp.ClientSession, url: str, call: dict[str, Any], run: Run) -> None:
    sent = time.perf_counter()
    try:
        status, _, _ = await client.post(http, url, call)
    except aiohttp.ClientError:
        run.hook_errors += 1
        return
    run.hook_ms.append((time.perf_counter() - sent) * 1000)
    run.hook_errors += status != 200


@dataclass(frozen=True)
class Schedule:
    """What the sender process needs: where, when (monotonic clock, shared by processes), how
    fast, and the hook calls' pace, whose request ids its matched events carry."""

    port: int
    run_name: str
    started: float
    seconds: float
    per_minute: float
    hook_rps: float


def send_events(schedule: Schedule, results: Connection) -> None:
    """The sender's process: its own event loop and CPU time, so the client timing the hook calls
    never waits behind it (Aperture sends events from elsewhere)."""
    run = Run(schedule.run_name, schedule.seconds)
    asyncio.run(_send_events(schedule, run))
    results.send((run.events_sent, run.events_failed, run.events_behind_s))


async def _send_events(schedule: Schedule, run: Run) -> None:
    sender = EventSender(schedule.port, event_templates(), run)
    connections = [asyncio.create_task(sender.connection()) for _ in range(CONNECTIONS)]
    await pace_events(sender, schedule, run)
    # The last events still in the queue or on the wire get their answers.
    deadline = time.monotonic() + DRAIN_S
    while (not sender.queue.empty() or sender.busy) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for task in connections:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            await task


async def pace_events(sender: EventSender, schedule: Schedule, run: Run) -> None:
    """Events evenly paced: a hook call's once it has had `MATCH_AFTER_S` to be answered, else an
    unknown id."""
    stop = schedule.started + schedule.seconds
    matched = 0
    for number in itertools.count():
        due = schedule.started + number * 60 / schedule.per_minute
        if due >= stop:
            return
        run.events_behind_s = max(run.events_behind_s, time.monotonic() - due)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if schedule.started + matched / schedule.hook_rps + MATCH_AFTER_S <= time.monotonic():
            event_id = request_id(schedule.run_name, matched)
            matched += 1
        else:
            event_id = f"elsewhere-{schedule.run_name}-{number}"
        sender.queue.put_nowait(sender.request(event_id, number))


async def sample(target: Target, run: Run, stop: float) -> None:
    async with aiohttp.ClientSession() as http:
        while True:
            _sample_rss(target, run)
            run.pending_max = max(run.pending_max, await gauge(http, target.url, "hookd_usage_pending_requests"))
            if time.monotonic() >= stop:
                return
            await asyncio.sleep(RSS_EVERY_S)


def _sample_rss(target: Target, run: Run) -> None:
    run.rss_mb.append(target.front.memory_info().rss / MIB)
    if target.events_process is not None:
        run.events_rss_mb.append(target.events_process.memory_info().rss / MIB)


def _cpu_s(process: psutil.Process) -> float:
    return float(sum(process.cpu_times()[:2]))


async def gauge(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def start_hookd(state: Path, events_on: str) -> Hookd:
    if events_on == "hook-listener":
        return Hookd(state_dir=state, pool_size=2)
    return Hookd("--events-listen", f"127.0.0.1:{free_port()}", state_dir=state, pool_size=2)


def target_of(hookd: Hookd) -> Target:
    ready = hookd.wait_ready()
    front = psutil.Process(hookd.proc.pid)
    if "events_process" not in ready:
        return Target(hookd.url, hookd.port, front, None)
    events = ready["events_process"]
    port = int(events["url"].rsplit(":", 1)[1].split("/")[0])
    return Target(hookd.url, port, front, psutil.Process(events["pid"]))


async def measure(args: argparse.Namespace) -> list[Run]:
    calls = hook_traffic()
    runs = []
    with tempfile.TemporaryDirectory() as state, start_hookd(Path(state), args.events_on) as hookd:
        target = target_of(hookd)
        # The warm-up sends events too: both arms then measure the server an operator runs,
        # its usage series and its waiting requests already there, not one that never saw an event.
        warm = Run("warm-up", args.warmup)
        await drive(target, warm, calls, args, events=True)
        for round_number in range(args.rounds):
            # Without then with, then with then without: a drift of the machine over the runs
            # (another tenant, a warmer cache) falls on both arms alike.
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for events in order:
                run = Run(f"{'with' if events else 'without'}-events-{round_number}", args.minutes * 60)
                async with aiohttp.ClientSession() as http:
                    before = await gauge(http, hookd.url, "hookd_usage_events_total")
                    await drive(target, run, calls, args, events)
                    # The last events are counted once the hook calls stop, at most this late.
                    await asyncio.sleep(BACKLOG_DELAY_S + 0.5)
                    run.counted = await gauge(http, hookd.url, "hookd_usage_events_total") - before
                runs.append(run)
    return runs


def verdict(runs: list[Run]) -> dict[str, Any]:
    without = [r for r in runs if r.name.startswith("without")]
    with_events = [r for r in runs if r.name.startswith("with-")]
    ratio = _rank(_latencies(with_events), 0.99) / max(_rank(_latencies(without), 0.99), 1e-9)
    growth = max(_growth(r.rss_mb) for r in with_events)
    events_growth = max(_growth(r.events_rss_mb) for r in with_events)
    return {
        "p99_ratio": ratio,
        "p99_within": ratio <= LATENCY_RATIO,
        "rss_growth_mb": growth,
        "events_process_rss_growth_mb": events_growth,
        "rss_flat": max(growth, events_growth) <= RSS_SLACK_MB,
        "pending_max": max(r.pending_max for r in runs),
    }


def _growth(rss_mb: list[float]) -> float:
    return rss_mb[-1] - rss_mb[0] if rss_mb else 0.0


def _latencies(runs: list[Run]) -> list[float]:
    return sorted(ms for run in runs for ms in run.hook_ms)


def report(runs: list[Run], result: dict[str, Any], command: str) -> str:
    lines = [
        "# Events under load",
        "",
        f"- command: `{command}`",
        f"- hook p99 with events / without: **{result['p99_ratio']:.3f}** (pass: <= {LATENCY_RATIO})",
        f"- front-end RSS growth over an events run: **{result['rss_growth_mb']:+.1f} MB** "
        f"(flat: <= {RSS_SLACK_MB} MB); the events process's: **{result['events_process_rss_growth_mb']:+.1f} MB**",
        f"- most requests waiting for their event: {result['pending_max']:.0f}",
        "",
        "| run | s | hook requests | errors | p50 ms | p90 ms | p99 ms | events sent | failed | per minute "
        "| sender behind s | front-end CPU s | front-end RSS first / last / max MB | events process CPU s "
        "| events process RSS first / last MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for run in runs:
        s = run.summary()
        lines.append(
            f"| {s['run']} | {s['seconds']:.0f} | {s['hook_requests']} | {s['hook_errors']} | {s['hook_p50_ms']:.1f} "
            f"| {s['hook_p90_ms']:.1f} | {s['hook_p99_ms']:.1f} | {s['events_sent']} | {s['events_failed']} "
            f"| {s['events_per_minute']:.0f} | {s['events_behind_s']:.2f} | {s['front_end_cpu_s']:.1f} "
            f"| {s['rss_first_mb']:.1f} / {s['rss_last_mb']:.1f} / {s['rss_max_mb']:.1f} "
            f"| {s['events_process_cpu_s']:.1f} "
            f"| {s['events_process_rss_first_mb']:.1f} / {s['events_process_rss_last_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s runs, 2,000 events a minute (for the test suite)")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each run (default %(default)s)")
    parser.add_argument("--events-per-minute", type=float, default=10_000, help="(default %(default)s)")
    parser.add_argument("--hook-rps", type=float, default=4.0, help="hook calls a second (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs, without then with (default %(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds of hook traffic first (default %(default)s)"
    )
    parser.add_argument(
        "--events-on",
        choices=("own-listener", "hook-listener"),
        default="own-listener",
        help="own-listener: hookd --events-listen, events taken by a process of their own; hook-listener: "
        "events to /events on the hook's listener (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.events_per_minute, args.warmup = 20 / 60, 2_000, 5.0
    runs = asyncio.run(measure(args))
    result = verdict(runs)
    command = "python -m bench.events " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(runs, result, command.strip())
    out = args.out or Path("bench/results") / time.strftime("events-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    document = {"runs": [r.summary() for r in runs], "verdict": result}
    (out / "results.json").write_text(json.dumps(document, indent=1))
    print(text)
    print(f"written to {out}")
    return 0 if result["p99_within"] and result["rss_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
