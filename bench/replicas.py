"""Two hookd replicas sharing conversation state in Redis behind haproxy, against one hookd: what
the provider bills, whether already-sent history stays put, and what a dying replica or a failing
Redis costs the requests.

    python -m bench.replicas [--quick] [--sessions a,b] [--skip-faults] [--out DIR]

1. **Billing and stability.** Every corpus session, turn by turn, through one hookd (memory only,
   the CPU count of workers) and through haproxy over two replicas (half as many workers each)
   sharing one `redis-server`; between turns both wait for background work as an agent's reply
   would give them time to. Each request is billed by `bench.cache.Bill` on the warm clock (a
   second between requests; hookd sees the real clock, so every cache is warm for it too), and
   every change to already-sent history is counted by the reason the serving replica's `-v` line
   gives (`rewrite=`, a fresh record) or none ("unexplained").
2. **A replica killed.** Two sessions at once through haproxy; one replica is SIGKILLed with
   requests in flight. Every request must be answered, and the conversations go on with their
   history byte for byte.
3. **Redis faults.** A client replays sessions without pause while Redis is stopped and started
   again, paused (SIGSTOP), slowed (`DEBUG SLEEP`) and flooded (`redis-benchmark`). Per phase: the
   answers' statuses, hookd's own time per request (the `-v` line's `dur_ms` less the worker's time
   and the wait for one: no compression) against the allowance plus 50 ms, and how long after
   Redis came back both replicas were sharing again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import billing, quality
from bench.cache import QUICK_SESSIONS, Bill, SessionResult, times
from bench.replay import RESULTS_DIR, LineTap, machine_info
from hookd import sticky
from tests import corpus, deployment
from tests.hookd_process import Hookd

ALLOWANCE_MS = 50.0
# hookd's own time per request may exceed the Redis allowance by this much (the acceptance bound).
OWN_MS = 50.0
BILLED_TOLERANCE = 0.005
SETTLE_S = 0.1
SETTLE_LIMIT_S = 30.0
PHASE_S = 4.0
# How long each phase goes on after Redis returns, beyond the fault's own length.
RECOVERY_MARGIN_S = 2.0
BUSY = re.compile(r"^hookd_pool_busy (\S+)$", re.M)
AVAILABLE = re.compile(r"^hookd_state_available (\S+)$", re.M)
FAULT_SESSIONS = ("cc-reliability-coverage-test-fix", "mini-deepseek-django-14752")


def retagged(call: dict[str, Any], tag: str) -> dict[str, Any]:
    """The call under a session id of its own per run, so no run finds another's records."""
    metadata = call.get("metadata") or {}
    session_id = f"{tag}:{metadata.get('session_id') or 'none'}"
    return {**call, "metadata": {**metadata, "session_id": session_id}}


def reason_text(fields: dict[str, Any]) -> str:
    """What `Bill` reads from a -v line to explain a change of history."""
    return f"rewrite={fields.get('rewrite', '-')} frozen={fields.get('frozen', 0)}"


def own_ms(fields: dict[str, Any]) -> float:
    """hookd's own time for a request: all of it but compression and the wait for a worker."""
    return float(fields["dur_ms"]) - float(fields.get("worker_ms", 0)) - float(fields.get("wait_ms", 0))


class Target:
    """Where requests go, and the -v line of the replica that served each."""

    def __init__(self, url: str, replicas: dict[str, Hookd]) -> None:
        self.url = url
        self.replicas = replicas
        self.taps = {name: LineTap(hookd) for name, hookd in replicas.items()}

    async def send(self, http: aiohttp.ClientSession, call: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
        """Status, answer and the serving replica's -v line fields ({} when none could be told)."""
        async with http.post(self.url, data=orjson.dumps(call), headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
            served = r.headers.get(deployment.REPLICA_HEADER) or next(iter(self.taps))
        answer = orjson.loads(raw) if r.status == 200 else None
        tap = self.taps.get(served)
        fields = (await tap.take(1))[0] if tap is not None and r.status == 200 else {}
        return r.status, answer, fields

    async def settle(self, http: aiohttp.ClientSession) -> None:
        """Until no replica has a worker busy (background work after the last answer) twice running."""
        await asyncio.sleep(SETTLE_S)
        deadline, quiet = time.monotonic() + SETTLE_LIMIT_S, 0
        while quiet < 2 and time.monotonic() < deadline:
            busy = 0.0
            for hookd in self.replicas.values():
                async with http.get(hookd.url + "metrics") as response:
                    found = BUSY.search(await response.text())
                busy += float(found.group(1)) if found else 0.0
            quiet = quiet + 1 if busy == 0 else 0
            await asyncio.sleep(0.05)


def sent_messages(call: dict[str, Any], answer: Any) -> list[Any]:
    if isinstance(answer, dict) and answer.get("action") == "modify":
        return list(answer["request_body"]["messages"])
    return list(call["request_body"]["messages"])


async def replay_sessions(target: Target, sessions: list[dict[str, Any]], tag: str) -> dict[str, SessionResult]:
    """Each session turn by turn through `target`, billed and checked for changes of history."""
    meter = billing.Meter()
    out: dict[str, SessionResult] = {}
    async with aiohttp.ClientSession() as http:
        for session in sessions:
            bill = Bill(session, meter, quality.evidence(session), plain=False)
            at = times(session, "warm")
            for index, call in enumerate(corpus.hook_calls(session)):
                call = retagged(call, tag)
                status, answer, fields = await target.send(http, call)
                if status != 200:
                    raise RuntimeError(f"{session['name']} turn {index}: HTTP {status}")
                bill.take(index, call["request_body"], sent_messages(call, answer), at[index], reason_text(fields))
                await target.settle(http)
            out[session["name"]] = bill.result
            print(f"bench.replicas: {tag}: {session['name']} ({bill.result.turns} turns)", file=sys.stderr)
    return out


@dataclass
class Comparison:
    single: float
    shared: float
    changes: dict[str, Counter[str]]
    turns: int

    @property
    def ratio(self) -> float:
        return self.shared / self.single

    @property
    def unexplained(self) -> int:
        return sum(c.get("unexplained", 0) for c in self.changes.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "billed_single": self.single,
            "billed_replicas": self.shared,
            "ratio": self.ratio,
            "turns": self.turns,
            "changes": {run: dict(c) for run, c in self.changes.items()},
            "unexplained": self.unexplained,
        }


def compare(single: dict[str, SessionResult], shared: dict[str, SessionResult]) -> Comparison:
    changes = {
        "single": sum((r.changes for r in single.values()), Counter()),
        "replicas": sum((r.changes for r in shared.values()), Counter()),
    }
    return Comparison(
        single=sum(r.billed for r in single.values()),
        shared=sum(r.billed for r in shared.values()),
        changes=changes,
        turns=sum(r.turns for r in shared.values()),
    )


def redis_memory(redis: deployment.Redis) -> int:
    found = re.search(r"^used_memory:(\d+)", redis.cli("INFO", "memory").stdout, re.M)
    return int(found.group(1)) if found else 0


# -- a replica killed ------------------------------------------------------------------------


@dataclass
class KillResult:
    requests: int = 0
    failed: list[str] = field(default_factory=list)  # requests not answered 200
    unstable: list[str] = field(default_factory=list)  # turns whose history changed without a reason
    after_kill: int = 0

    def as_json(self) -> dict[str, Any]:
        return vars(self)


async def kill_mid_session(
    deployed: deployment.Deployment, conversations: list[list[dict[str, Any]]], victim: str, after: int, tag: str
) -> KillResult:
    """The conversations (each a list of hook calls) at once; `victim` SIGKILLed once `after`
    requests have been answered, while the others are in flight."""
    target = Target(deployed.url, deployed.replicas)
    result = KillResult()
    killed = asyncio.Event()

    async def one(http: aiohttp.ClientSession, number: int, calls: list[dict[str, Any]]) -> None:
        previous: list[bytes] | None = None
        for index, call in enumerate(calls):
            call = retagged(call, tag)
            status, answer, fields = await target.send(http, call)
            result.requests += 1
            result.after_kill += killed.is_set()
            where = f"conversation {number} turn {index}"
            if status != 200:
                result.failed.append(f"{where}: HTTP {status}")
                continue
            sent = [sticky.canonical(m) for m in sent_messages(call, answer)]
            explained = fields.get("rewrite", "-") != "-" or fields.get("frozen", 0) == 0
            if previous is not None and sent[: len(previous)] != previous and not explained:
                result.unstable.append(where)
            previous = sent
            if result.requests >= after and not killed.is_set():
                killed.set()

    async def kill() -> None:
        await killed.wait()
        # The other client's request is in flight now, to either replica.
        os.kill(deployed.replicas[victim].proc.pid, signal.SIGKILL)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(kill(), *(one(http, n, calls) for n, calls in enumerate(conversations)))
    return result


# -- Redis faults ----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    statuses: Counter[int] = field(default_factory=Counter)
    own: list[float] = field(default_factory=list)
    shared_again_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        own = sorted(self.own)
        return {
            "name": self.name,
            "requests": sum(self.statuses.values()),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "own_ms_p50": own[len(own) // 2] if own else None,
            "own_ms_p99": own[int(len(own) * 0.99)] if own else None,
            "own_ms_max": own[-1] if own else None,
            "over_bound": sum(o > ALLOWANCE_MS + OWN_MS for o in own),
            "shared_again_s": self.shared_again_s,
        }


class Traffic:
    """A client replaying conversations without pause, turn after turn, a new tag each time round."""

    def __init__(self, target: Target, conversations: list[list[dict[str, Any]]]) -> None:
        self.target = target
        self.conversations = conversations
        self.phase = Phase("start")
        self.stopping = False

    async def run(self) -> None:
        rounds = 0
        async with aiohttp.ClientSession() as http:
            while not self.stopping:
                rounds += 1
                for calls in self.conversations:
                    for call in calls:
                        if self.stopping:
                            return
                        phase = self.phase
                        status, _, fields = await self.target.send(http, retagged(call, f"faults-{rounds}"))
                        phase.statuses[status] += 1
                        if fields:
                            phase.own.append(own_ms(fields))


async def available_everywhere(http: aiohttp.ClientSession, replicas: dict[str, Hookd]) -> bool:
    for hookd in replicas.values():
        async with http.get(hookd.url + "metrics") as response:
            found = AVAILABLE.search(await response.text())
        if not found or float(found.group(1)) != 1:
            return False
    return True


async def faults(
    deployed: deployment.Deployment, conversations: list[list[dict[str, Any]]], seconds: float = PHASE_S
) -> list[Phase]:
    """Each Redis fault in turn for `seconds`, under traffic, and a while after it."""
    redis = deployed.redis
    target = Target(deployed.url, deployed.replicas)
    traffic = Traffic(target, conversations)
    phases: list[Phase] = []
    running = asyncio.ensure_future(traffic.run())

    async def phase(name: str, start: Callable[[], Any], end: Callable[[], Any]) -> None:
        during = Phase(name)
        traffic.phase = during
        phases.append(during)
        await asyncio.to_thread(start)
        await asyncio.sleep(seconds)
        await asyncio.to_thread(end)
        after = Phase(f"{name}: after")
        traffic.phase = after
        phases.append(after)
        returned = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - returned < seconds + RECOVERY_MARGIN_S:
                if after.shared_again_s is None and await available_everywhere(http, deployed.replicas):
                    after.shared_again_s = time.monotonic() - returned
                await asyncio.sleep(0.1)

    def nothing() -> None:
        return None

    flood: list[subprocess.Popen[bytes]] = []

    def start_flood() -> None:
        command = ["redis-benchmark", "-p", str(redis.port), "--user", "admin", "-a", deployment.ADMIN_PASSWORD]
        command += ["-c", "50", "-n", "10000000", "-d", "4096", "-t", "set,get", "-q"]
        flood.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop_flood() -> None:
        flood[0].terminate()
        flood[0].wait()

    sleeper: list[subprocess.Popen[bytes]] = []

    def sleep_redis() -> None:
        sleeper.append(subprocess.Popen(redis.command("DEBUG", "SLEEP", str(seconds)), stdout=subprocess.DEVNULL))

    try:
        await phase("healthy", nothing, nothing)
        await phase("stopped", redis.stop, redis.start)
        await phase("paused", lambda: redis.signal(signal.SIGSTOP), lambda: redis.signal(signal.SIGCONT))
        await phase("slowed", sleep_redis, lambda: sleeper[0].wait())
        await phase("flooded", start_flood, stop_flood)
    finally:
        traffic.stopping = True
        with suppress(Exception):
            await running
    return phases


# -- the report ------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = [
        "# Two replicas with shared state against one hookd",
        "",
        f"- command: `{results['command']}`; took {results['wall_s']:.0f} s; machine: "
        f"{results['machine']['cpu_count']} cores, load {'/'.join(f'{x:.2f}' for x in results['machine']['loadavg'])}",
    ]
    billed = results.get("billing")
    if billed:
        verdict = "met" if abs(billed["ratio"] - 1) <= BILLED_TOLERANCE and not billed["unexplained"] else "missed"
        lines += [
            "",
            "## Billed input and prefix stability (warm clock)",
            "",
            f"- {len(results['sessions'])} sessions, {billed['turns']} requests",
            f"- billed input, two replicas / one hookd: **{billed['ratio']:.4f}** "
            f"({billed['billed_replicas']:,.0f} / {billed['billed_single']:,.0f} input-token equivalents; "
            f"target within {BILLED_TOLERANCE:.1%}: {verdict})",
            "",
            "| run | changes of sent history by reason | unexplained |",
            "|---|---|---:|",
        ]
        for run, changes in billed["changes"].items():
            shown = ", ".join(f"{k} {v}" for k, v in sorted(changes.items()) if k != "unexplained") or "none"
            lines.append(f"| {run} | {shown} | {changes.get('unexplained', 0)} |")
    memory = results.get("redis")
    if memory:
        lines += [
            "",
            f"Redis held {memory['bytes'] / 2**20:.1f} MiB for {memory['conversations']} conversations after the "
            f"replay, {memory['bytes'] / max(1, memory['history_bytes']):.2f} bytes per byte of their final "
            f"requests' messages ({memory['history_bytes'] / 2**20:.1f} MiB).",
        ]
    kill = results.get("kill")
    if kill:
        lines += [
            "",
            "## A replica SIGKILLed mid-session",
            "",
            f"- {kill['requests']} requests, {kill['after_kill']} of them after the kill; not answered 200: "
            f"{len(kill['failed'])}; turns whose history changed without a reason: {len(kill['unstable'])}",
        ]
    phases = results.get("faults")
    if phases:
        lines += [
            "",
            "## Redis faults",
            "",
            f"hookd's own time per request (the -v line's dur_ms less worker_ms and wait_ms), against the "
            f"bound of the allowance ({ALLOWANCE_MS:.0f} ms) plus {OWN_MS:.0f} ms; 'shared again': seconds "
            "from Redis's return until both replicas' breakers had closed.",
            "",
            "| phase | requests | statuses | own ms p50 | p99 | max | over bound | shared again s |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for p in phases:
            statuses = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
            again = "-" if p["shared_again_s"] is None else f"{p['shared_again_s']:.1f}"
            lines.append(
                f"| {p['name']} | {p['requests']} | {statuses} | {_ms(p['own_ms_p50'])} | {_ms(p['own_ms_p99'])} "
                f"| {_ms(p['own_ms_max'])} | {p['over_bound']} | {again} |"
            )
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


async def measure(sessions: list[dict[str, Any]], home: Path, run_faults: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    workers = os.cpu_count() or 1
    with Hookd(state_dir=home / "single", pool_size=workers) as single:
        alone = await replay_sessions(Target(single.url, {"single": single}), sessions, "single")
    deployed = deployment.Deployment(home / "replicas", pool_size=max(1, workers // 2))
    try:
        empty = redis_memory(deployed.redis)
        shared = await replay_sessions(Target(deployed.url, deployed.replicas), sessions, "replicas")
        out["billing"] = compare(alone, shared).as_json()
        out["redis"] = {
            "bytes": redis_memory(deployed.redis) - empty,
            "conversations": sum(k.endswith(":m") for k in deployed.redis.cli("--scan").stdout.split()),
            "history_bytes": sum(
                len(orjson.dumps(corpus.hook_calls(s)[-1]["request_body"]["messages"])) for s in sessions
            ),
        }
        chosen = [corpus.hook_calls(s) for s in sessions if s["name"] in FAULT_SESSIONS]
        chosen = chosen or [corpus.hook_calls(s) for s in sessions[:2]]
        if run_faults:
            out["faults"] = [p.as_json() for p in await faults(deployed, chosen)]
        killed = await kill_mid_session(deployed, chosen, "hookd1", after=len(chosen[0]) // 2, tag="kill")
        out["kill"] = killed.as_json()
    finally:
        deployed.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small sessions: {', '.join(sorted(QUICK_SESSIONS))}")
    parser.add_argument("--sessions", help="comma-separated session names (default: the whole corpus)")
    parser.add_argument("--skip-faults", action="store_true", help="billing and the killed replica only")
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if not corpus.available():
        print(corpus.why_missing(), file=sys.stderr)
        return 2
    why = deployment.missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    names = set(args.sessions.split(",")) if args.sessions else QUICK_SESSIONS if args.quick else None
    sessions = corpus.sessions(names)
    out = args.out or RESULTS_DIR / time.strftime("replicas-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as home:
        results = asyncio.run(measure(sessions, Path(home), not args.skip_faults))
    results |= {
        "command": "python -m bench.replicas " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.monotonic() - started,
        "machine": machine_info(),
        "sessions": [s["name"] for s in sessions],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "report.md").write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
