"""Side-by-side corpus replay: what hookd adds on top of headroom, and whether affinity holds.

This module owns the replay benchmark (`python -m bench.replay [--quick] [--out DIR]`):

1. The largest corpus session replayed turn by turn, alternately (a) in-process, through a fresh
   `worker.engine.Engine` in a spawned child, and (b) through a running `hookd`, timed on the client.
   Then every turn once more per response Accept-Encoding, and the cost of a cold recompress.
2. Two sessions on different affinity slots, interleaved sequentially and sent concurrently, with
   affinity on and off, to report hit rates and latency.
3. Raw numbers as JSON and a Markdown report in --out; the Markdown also goes to stdout.

It only drives hookd from outside (tests.hookd_process, tests.client) and reuses the worker's own
Engine, so it measures exactly what the service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import logging
import math
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.floor import close_child
from hookd.affinity import session_key, slot_for
from hookd.settings import Settings
from tests import client, corpus
from tests.hookd_process import Hookd

POOL_SIZE = 2
# The brief's example of a small recorded session; --quick falls back to a turn cap without it.
QUICK_SESSION = "cc-spotter-subagent-a2898e3"
QUICK_TURNS = 12
TARGET_RATIO = 1.2
TARGET_HIT_RATE = 0.95
# "Large" turns for the where-the-time-goes split: big enough that per-byte costs dominate.
LARGE_BYTES = 512 * 1024
# Response Accept-Encoding variants. None keeps aiohttp's default header; gzip alone is what Go's
# net/http (so Aperture) sends.
ENCODINGS: dict[str, dict[str, str] | None] = {
    "default": None,
    "identity": {"Accept-Encoding": "identity"},
    "gzip": {"Accept-Encoding": "gzip"},
}
READY_TIMEOUT_S = 180.0
LINE_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


# -- corpus ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One corpus session's hook calls, pre-serialised so client-side JSON encoding stays untimed."""

    name: str
    session_id: str
    slot: int
    calls: list[dict[str, Any]]
    bodies: list[bytes]

    @property
    def turns(self) -> int:
        return len(self.calls)


def manifest_rows() -> list[dict[str, Any]]:
    """Per-session stats from manifest.json, or computed from the sessions when it is absent."""
    path = corpus.corpus_dir() / "manifest.json"
    if path.is_file():
        return list(orjson.loads(path.read_bytes())["sessions"])
    return [
        {
            "name": session["name"],
            "session_id": session["session_id"],
            "final_request_bytes": len(orjson.dumps(corpus.hook_calls(session)[-1]["request_body"])),
        }
        for session in corpus.sessions()
    ]


def slot_of(session_id: str) -> int:
    # A non-empty session id alone decides the key, so no messages are needed here.
    return slot_for(session_key(session_id, []), POOL_SIZE)


def pick_replay(rows: list[dict[str, Any]], quick: bool) -> str:
    names = {row["name"] for row in rows}
    if quick and QUICK_SESSION in names:
        return QUICK_SESSION
    return largest(rows)["name"]


def largest(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda row: row["final_request_bytes"])


def pick_pair(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The largest session and the largest one with another session id on the other slot."""
    first = largest(rows)
    others = [r for r in rows if r["session_id"] and r["session_id"] != first["session_id"]]
    apart = [r for r in others if slot_of(r["session_id"]) != slot_of(first["session_id"])]
    # With no session on the other slot the pair collides; the report shows both slots.
    return first["name"], largest(apart or others)["name"]


def load_session(name: str, max_turns: int | None) -> Session:
    (raw,) = corpus.sessions({name})
    calls = corpus.hook_calls(raw)[:max_turns]
    session_id = calls[0]["metadata"]["session_id"]
    key = session_key(session_id, calls[0]["request_body"]["messages"])
    return Session(name, session_id, slot_for(key, POOL_SIZE), calls, [orjson.dumps(c) for c in calls])


# -- statistics -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def p90(values: Sequence[float]) -> float | None:
    """Nearest-rank p90: an observed value, and honest for the few dozen samples we have."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -- hookd's -v lines -----------------------------------------------------------------------------

FIELD = re.compile(r"(\w+)=(\S+)")


def parse_line(line: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in FIELD.findall(line.split(" -> ")[0]):
        try:
            fields[name] = float(value) if name.endswith("_ms") else int(value)
        except ValueError:
            fields[name] = value
    fields["cold"] = fields.get("cold") == "true"
    fields["outcome"] = line.rsplit(" -> ", 1)[-1].strip()
    return fields


class LineTap:
    """New `request(...)` lines from a running Hookd's stdout, which a reader thread fills."""

    def __init__(self, hookd: Hookd) -> None:
        self.lines = hookd.stdout
        self.seen = len(self.lines)

    async def take(self, count: int) -> list[dict[str, Any]]:
        # The line is written after the answer, so it may land a moment after the client is done.
        taken: list[dict[str, Any]] = []
        deadline = time.monotonic() + LINE_TIMEOUT_S
        while len(taken) < count:
            if self.seen < len(self.lines):
                line = self.lines[self.seen]
                self.seen += 1
                if line.startswith("request("):
                    taken.append(parse_line(line))
            elif time.monotonic() > deadline:
                raise TimeoutError(f"hookd printed {len(taken)} of {count} -v lines")
            else:
                await asyncio.sleep(0.002)
        return taken


# -- (a) in-process: a spawned child with its own Engine ------------------------------------------


def inprocess_child(conn: Connection, name: str, max_turns: int | None) -> None:
    """Child main: set up, prepare, import and warm exactly as worker/main.py does, then time turns."""
    # stdout carries the Markdown report; anything headroom prints goes to stderr, as in a worker.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="bench in-process: %(name)s: %(message)s")
    from worker import offline

    offline.prepare()
    from worker.engine import Engine

    engine = Engine()
    warmup_ms = engine.warm()
    # Messages as a worker gets them: JSON, decoded afresh per turn (untimed). The loader's
    # calls share message objects across turns, which would let headroom reuse per-object work
    # (cached str hashes, for one) that a worker never sees.
    calls = corpus.hook_calls(corpus.sessions({name})[0])[:max_turns]
    turns = [(orjson.dumps(call["request_body"]["messages"]), call["metadata"]["model"]) for call in calls]
    del calls
    # Collect the loading's garbage now: the worker has no such load, and its full collection
    # (~0.2 s over headroom's heap) would otherwise land on the first timed turn.
    gc.collect()
    pauses = GcPauses()
    conn.send({"headroom_version": engine.version, "warmup_ms": warmup_ms})
    while (turn := conn.recv()) is not None:
        conn.send(time_compress(engine, *turns[turn], pauses))


class GcPauses:
    """Time spent in full (generation 2) collections: headroom's heap makes one cost ~0.2 s.

    Only observes (gc.callbacks), so the child still behaves exactly like a worker; it lets the
    report tell a GC pause from headroom's own work when one turn stands out.
    """

    def __init__(self) -> None:
        self.total_ms = 0.0
        self._started = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total_ms += (time.perf_counter() - self._started) * 1000

    def take(self) -> float:
        total, self.total_ms = self.total_ms, 0.0
        return total


def time_compress(engine: Any, payload: bytes, model: str, pauses: GcPauses) -> dict[str, Any]:
    messages = orjson.loads(payload)
    pauses.take()
    started = time.perf_counter()
    reply = engine.compress(messages, model, {})
    elapsed = (time.perf_counter() - started) * 1000
    return {
        "ms": elapsed,
        "engine_ms": reply["worker_ms"],
        "gc_full_ms": pauses.take(),
        "tokens_before": reply["tokens_before"],
        "tokens_after": reply["tokens_after"],
    }


class InProcess:
    """The parent's handle on the in-process child; calls block, and nothing else runs meanwhile."""

    def __init__(self, session: Session) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.conn, theirs = spawn.Pipe()
        self.proc = spawn.Process(target=inprocess_child, args=(theirs, session.name, session.turns), daemon=True)
        self.proc.start()
        theirs.close()

    def wait_ready(self) -> dict[str, Any]:
        if not self.conn.poll(READY_TIMEOUT_S):
            raise TimeoutError("in-process engine not warm in time")
        return dict(self.conn.recv())

    def compress(self, turn: int) -> dict[str, Any]:
        self.conn.send(turn)
        return dict(self.conn.recv())

    def close(self) -> None:
        close_child(self.conn, self.proc)


# -- (b) through hookd ----------------------------------------------------------------------------


async def timed_post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    status, answer_headers, answer = await client.post(http, url, body, headers=headers)
    rtt_ms = (time.perf_counter() - started) * 1000
    return {
        "rtt_ms": rtt_ms,
        "status": status,
        "action": answer.get("action") if isinstance(answer, dict) else None,
        "content_encoding": answer_headers.get("Content-Encoding", "identity"),
        "wire_response_bytes": int(answer_headers.get("Content-Length", -1)),
    }


async def hookd_turn(
    http: aiohttp.ClientSession, url: str, tap: LineTap, body: bytes, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    posted = await timed_post(http, url, body, headers)
    (server,) = await tap.take(1)
    return posted | {"server": server}


def start_hookd(state_dir: str, *flags: str, history: str | None = None) -> tuple[Hookd, float]:
    """hookd with its default history policy, or `history` (hookd reads its settings file at
    start-up)."""
    if history is not None:
        (Path(state_dir) / "settings.json").write_text(f'{{"history": "{history}"}}')
    started = time.monotonic()
    hookd = Hookd(*flags, state_dir=Path(state_dir), pool_size=POOL_SIZE)
    try:
        hookd.wait_ready(READY_TIMEOUT_S)
    except BaseException:
        hookd.stop()
        raise
    return hookd, time.monotonic() - started


# -- part 1: one session, in-process vs hookd -----------------------------------------------------


def run_replay(session: Session, history: str | None) -> dict[str, Any]:
    inproc = InProcess(session)
    try:
        with tempfile.TemporaryDirectory() as state:
            # Both warm up at once: nothing is measured yet, and it saves a warm-up's wall time.
            hookd, ready_s = start_hookd(state, history=history)
            try:
                child = inproc.wait_ready()
                measured = asyncio.run(replay_phases(session, inproc, hookd))
            finally:
                hookd.stop()
    finally:
        inproc.close()
    return {"session": session.name, "turns": session.turns, "hookd_ready_s": ready_s, "child": child, **measured}


async def replay_phases(session: Session, inproc: InProcess, hookd: Hookd) -> dict[str, Any]:
    tap = LineTap(hookd)
    async with aiohttp.ClientSession() as http:
        turns = await side_by_side(session, inproc, http, hookd.url, tap)
        encodings = await encoding_repeats(session, inproc, http, hookd.url, tap)
        spill = await spill_cost(session, http, hookd.url, tap)
    return {"per_turn": turns, "encoding_repeats": encodings, "cold_recompress": spill}


async def side_by_side(
    session: Session, inproc: InProcess, http: aiohttp.ClientSession, url: str, tap: LineTap
) -> list[dict[str, Any]]:
    rows = []
    for turn, body in enumerate(session.bodies):
        # Alternate who goes first so a burst of noise from other work lands on both sides alike.
        hookd_first = turn % 2 == 1
        if hookd_first:
            via_hookd = await hookd_turn(http, url, tap, body)
        in_process = inproc.compress(turn)
        if not hookd_first:
            via_hookd = await hookd_turn(http, url, tap, body)
        rows.append(
            {
                "turn": turn,
                "messages": len(session.calls[turn]["request_body"]["messages"]),
                "request_bytes": len(body),
                "first": "hookd" if hookd_first else "inprocess",
                "inprocess": in_process,
                "hookd": via_hookd,
            }
        )
    return rows


async def encoding_repeats(
    session: Session, inproc: InProcess, http: aiohttp.ClientSession, url: str, tap: LineTap
) -> list[dict[str, Any]]:
    """Every turn again, once per Accept-Encoding and once in-process, in rotating order.

    All are repeats of a turn both sides have already seen, so they are equally warm and differ
    only in what happens around compress(): that isolates the cost of encoding the answer.
    """
    variants = ["inprocess", *ENCODINGS]
    rows = []
    for turn, body in enumerate(session.bodies):
        shift = turn % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant == "inprocess":
                measured = inproc.compress(turn)
            else:
                measured = await hookd_turn(http, url, tap, body, ENCODINGS[variant])
            rows.append({"turn": turn, "request_bytes": len(body), "variant": variant, **measured})
    return rows


async def spill_cost(session: Session, http: aiohttp.ClientSession, url: str, tap: LineTap) -> dict[str, Any]:
    """The final turn on the worker that never saw the session (a spill), then once more there."""
    call = session.calls[-1]
    stranger = other_slot_session_id(session.slot)
    body = orjson.dumps({**call, "metadata": {**call["metadata"], "session_id": stranger}})
    cold = await hookd_turn(http, url, tap, body)
    warm = await hookd_turn(http, url, tap, body)
    return {"turn": session.turns - 1, "request_bytes": len(body), "hookd_spill": cold, "hookd_spill_again": warm}


def other_slot_session_id(home: int) -> str:
    n = 0
    while slot_of(f"bench-spill-{n}") == home:
        n += 1
    return f"bench-spill-{n}"


# -- part 2: two sessions, affinity on and off ----------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """Turns [start, stop) of both sessions, sent one request at a time or by two clients at once."""

    mode: str
    start: int = 0
    stop: int | None = None

    def turns(self, session: Session) -> range:
        return range(self.start, session.turns if self.stop is None else min(self.stop, session.turns))


def affinity_plan(quick: bool) -> list[list[Phase]]:
    """The phases for one affinity setting, one inner list per fresh hookd."""
    if quick:
        # Two hookd start-ups instead of four keep --quick short: the concurrent phase continues
        # both sessions where the sequential one stopped, as the agents themselves would.
        half = QUICK_TURNS // 2
        return [[Phase("sequential", 0, half), Phase("concurrent", half)]]
    # A fresh hookd per mode, each replaying from the first turn: neither finds the other's
    # turns already cached, so their latencies compare.
    return [[Phase("sequential")], [Phase("concurrent")]]


def run_affinity(first: Session, second: Session, quick: bool) -> list[dict[str, Any]]:
    scenarios = []
    for affinity in (True, False):
        for phases in affinity_plan(quick):
            scenarios += run_on_one_hookd(first, second, affinity, phases)
    return scenarios


def run_on_one_hookd(first: Session, second: Session, affinity: bool, phases: list[Phase]) -> list[dict[str, Any]]:
    flags = () if affinity else ("--no-affinity",)
    scenarios = []
    with tempfile.TemporaryDirectory() as state:
        hookd, ready_s = start_hookd(state, *flags)
        try:
            for phase in phases:
                requests = asyncio.run(drive_pair(hookd, first, second, phase))
                scenarios.append(
                    {
                        "affinity": affinity,
                        "mode": phase.mode,
                        "turns": [phase.start, phase.stop],
                        "hookd_ready_s": ready_s,
                        "requests": requests,
                    }
                )
        finally:
            hookd.stop()
    return scenarios


async def drive_pair(hookd: Hookd, first: Session, second: Session, phase: Phase) -> list[dict[str, Any]]:
    tap = LineTap(hookd)
    if phase.mode == "sequential":
        async with aiohttp.ClientSession() as http:
            sent = [await post_labelled(http, hookd.url, s, turn) for s, turn in interleaved(first, second, phase)]
    else:
        clients = await asyncio.gather(send_all(hookd.url, first, phase), send_all(hookd.url, second, phase))
        sent = [row for rows in clients for row in rows]
    lines = await tap.take(len(sent))
    return attach_lines(sent, lines)


def interleaved(first: Session, second: Session, phase: Phase) -> list[tuple[Session, int]]:
    """A1 B1 A2 B2 ...; the longer session carries on alone once the shorter one has ended."""
    turns = {s.name: phase.turns(s) for s in (first, second)}
    order = []
    for turn in range(phase.start, max(r.stop for r in turns.values())):
        order += [(s, turn) for s in (first, second) if turn in turns[s.name]]
    return order


async def send_all(url: str, session: Session, phase: Phase) -> list[dict[str, Any]]:
    # One client per session, like two agents each waiting for its own answer before the next turn.
    async with aiohttp.ClientSession() as http:
        return [await post_labelled(http, url, session, turn) for turn in phase.turns(session)]


async def post_labelled(http: aiohttp.ClientSession, url: str, session: Session, turn: int) -> dict[str, Any]:
    posted = await timed_post(http, url, session.bodies[turn])
    return {"session": session.name, "turn": turn, "request_bytes": len(session.bodies[turn]), **posted}


def attach_lines(sent: list[dict[str, Any]], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair each request with its -v line by body size (unique per turn here), in order on ties."""
    by_size: dict[int, deque[dict[str, Any]]] = defaultdict(deque)
    for line in lines:
        by_size[int(line["in_bytes"])].append(line)
    for row in sent:
        queue = by_size[row["request_bytes"]]
        row["server"] = queue.popleft() if queue else {}
    return sent


# -- summaries ------------------------------------------------------------------------------------


def inproc_ms(rows: list[dict[str, Any]]) -> list[float]:
    return [r["inprocess"]["ms"] for r in rows]


def rtt_ms(rows: list[dict[str, Any]]) -> list[float]:
    return [r["hookd"]["rtt_ms"] for r in rows]


def server_ms(rows: list[dict[str, Any]], field: str) -> list[float]:
    return [r["hookd"]["server"][field] for r in rows]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"median": median(values), "p90": p90(values), "mean": mean(values), "n": len(values)}


def replay_summary(replay: dict[str, Any]) -> dict[str, Any]:
    rows = replay["per_turn"]
    warm = rows[1:]
    large = [r for r in warm if r["request_bytes"] >= LARGE_BYTES]
    modify_turns = {r["turn"] for r in warm if r["hookd"]["server"]["outcome"] == "modify"}
    summary = {
        "inprocess": spread(inproc_ms(warm)),
        "hookd_rtt": spread(rtt_ms(warm)),
        "hookd_dur": spread(server_ms(warm, "dur_ms")),
        "hookd_worker": spread(server_ms(warm, "worker_ms")),
        "ratio": ratio(median(rtt_ms(warm)), median(inproc_ms(warm))),
        "large_turns": len(large),
        "large_ratio": ratio(median(rtt_ms(large)), median(inproc_ms(large))),
        "breakdown": breakdown(warm),
        "breakdown_large": breakdown(large),
        "inprocess_gc_pauses": {r["turn"]: r["inprocess"]["gc_full_ms"] for r in rows if r["inprocess"]["gc_full_ms"]},
        "encodings": encoding_summary(replay["encoding_repeats"], modify_turns),
    }
    return summary | {"cold": cold_summary(replay, summary)}


# Where a hookd round trip goes, from the client's clock and the -v line's fields (whole ms).
# "IPC and front end" is what is left of dur_ms: decode and parse the body, frame it to the
# worker and its reply back (the worker's own JSON work is outside worker_ms), merge, validate,
# build the modify body and encode the answer.
COMPONENTS = {
    "outside the handler (client, HTTP parsing, loopback, answer decoding)": lambda h, s: h["rtt_ms"] - s["dur_ms"],
    "read_ms (receive body)": lambda h, s: s["read_ms"],
    "wait_ms (queue for a worker)": lambda h, s: s["wait_ms"],
    "worker_ms (compress() in the worker)": lambda h, s: s["worker_ms"],
    "IPC and front end (dur_ms - read - wait - worker - write)": lambda h, s: (
        s["dur_ms"] - s["read_ms"] - s["wait_ms"] - s["worker_ms"] - s["write_ms"]
    ),
    "write_ms (send answer)": lambda h, s: s["write_ms"],
}


def breakdown(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    parts = {}
    for name, part in COMPONENTS.items():
        values = [part(r["hookd"], r["hookd"]["server"]) for r in rows]
        parts[name] = {"mean": mean(values), "median": median(values)}
    parts["= hookd round trip"] = {"mean": mean(rtt_ms(rows)), "median": median(rtt_ms(rows))}
    parts["in-process compress, for reference"] = {"mean": mean(inproc_ms(rows)), "median": median(inproc_ms(rows))}
    return parts


def encoding_summary(rows: list[dict[str, Any]], modify_turns: set[int]) -> dict[str, dict[str, Any]]:
    """Per variant over warm turns; the modify turns are the ones whose answer can be encoded."""
    by_variant: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["turn"] > 0:
            by_variant[row["variant"]][row["turn"]] = row
    baseline = by_variant["identity"]
    out = {}
    for variant in ["inprocess", *ENCODINGS]:
        turns = by_variant[variant]
        key = "ms" if variant == "inprocess" else "rtt_ms"
        ordered = sorted(modify_turns)
        modify = [turns[t] for t in ordered]
        out[variant] = {
            "all": spread([r[key] for r in turns.values()]),
            "modify": spread([r[key] for r in modify]),
            # Paired per turn, so the turn-size mix cancels out of the comparison.
            "modify_delta_vs_identity_ms": median([turns[t][key] - baseline[t]["rtt_ms"] for t in ordered]),
            "codings": sorted({r["content_encoding"] for r in modify if "content_encoding" in r}),
            "modify_dur_ms": median([r["server"]["dur_ms"] for r in modify if "server" in r]),
            "modify_write_ms": median([r["server"]["write_ms"] for r in modify if "server" in r]),
            "modify_wire_bytes": median([r["wire_response_bytes"] for r in modify if "wire_response_bytes" in r]),
        }
    return out


def cold_summary(replay: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    first, last = replay["per_turn"][0], replay["per_turn"][-1]
    spill, again = replay["cold_recompress"]["hookd_spill"], replay["cold_recompress"]["hookd_spill_again"]
    return {
        "first_turn_bytes": first["request_bytes"],
        "first_turn_inprocess_ms": first["inprocess"]["ms"],
        "first_turn_inprocess_gc_ms": first["inprocess"]["gc_full_ms"],
        "first_turn_hookd_rtt_ms": first["hookd"]["rtt_ms"],
        "first_turn_hookd_worker_ms": first["hookd"]["server"]["worker_ms"],
        "final_turn_bytes": replay["cold_recompress"]["request_bytes"],
        "final_warm_inprocess_ms": last["inprocess"]["ms"],
        "final_warm_hookd_rtt_ms": last["hookd"]["rtt_ms"],
        "spill_slot": spill["server"].get("slot"),
        "spill_cold": spill["server"].get("cold"),
        "spill_rtt_ms": spill["rtt_ms"],
        "spill_worker_ms": spill["server"]["worker_ms"],
        "spill_again_rtt_ms": again["rtt_ms"],
        "spill_vs_warm_median": ratio(spill["rtt_ms"], summary["hookd_rtt"]["median"]),
        "spill_vs_final_warm": ratio(spill["rtt_ms"], last["hookd"]["rtt_ms"]),
        "affinity_wait_s": Settings().affinity_wait,
    }


def scenario_summary(scenario: dict[str, Any]) -> dict[str, Any]:
    rows = scenario["requests"]
    placements = [r["server"].get("affinity") for r in rows]
    hits, spills = placements.count("hit"), placements.count("spill")
    later = [r for r in rows if r["turn"] > 0]
    return {
        "affinity": scenario["affinity"],
        "mode": scenario["mode"],
        "turns": scenario["turns"],
        "requests": len(rows),
        "hits": hits,
        "spills": spills,
        "hit_rate": hits / (hits + spills) if hits + spills else None,
        # With --no-affinity every placement is "any"; cold=false still says the worker knew the session.
        "warm_rate": sum(r["server"].get("cold") is False for r in later) / len(later) if later else None,
        "same_worker_rate": same_worker_rate(rows),
        "rtt": spread([r["rtt_ms"] for r in later]),
        "worker": spread([r["server"].get("worker_ms", 0.0) for r in later]),
        "max_wait_ms": max((r["server"].get("wait_ms", 0.0) for r in rows), default=None),
    }


def same_worker_rate(rows: list[dict[str, Any]]) -> float | None:
    """How often a session's turn landed on the worker that served its previous turn."""
    previous: dict[str, Any] = {}
    same = total = 0
    for row in sorted(rows, key=lambda r: (r["session"], r["turn"])):
        slot = row["server"].get("slot")
        if row["session"] in previous:
            total += 1
            same += slot == previous[row["session"]]
        previous[row["session"]] = slot
    return same / total if total else None


# -- report ---------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_total_mib": int(meminfo["MemTotal"].split()[0]) // 1024,
        "mem_available_mib": int(meminfo["MemAvailable"].split()[0]) // 1024,
        "loadavg": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "headroom": metadata.version("headroom-ai"),
        "aiohttp": aiohttp.__version__,
        "aiohttp_default_accept_encoding": default_accept_encoding(),
        "source_digest": source_digest(),
    }


def source_digest() -> str:
    """A fingerprint of the code measured: hookd and worker change often, and have no commits yet."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("hookd/*.py"), *REPO.glob("worker/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def default_accept_encoding() -> str:
    # Private in aiohttp, hence the fallback; the report only quotes it.
    from aiohttp import client_reqrep

    generate = getattr(client_reqrep, "_gen_default_accept_encoding", None)
    return generate() if generate else "aiohttp default"


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def render(results: dict[str, Any]) -> str:
    return "\n".join([*render_header(results), *render_replay(results), *render_affinity(results)]) + "\n"


def render_header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    return [
        f"# hookd replay benchmark{' (--quick)' if results['quick'] else ''}",
        "",
        f"- command: `{results['command']}` (in `{results['cwd']}`)",
        f"- started {results['started']}, took {results['wall_s']:.0f} s",
        f"- machine: {m['cpu_count']} cores ({m['usable_cpus']} usable), {m['mem_total_mib']} MiB RAM "
        f"({m['mem_available_mib']} MiB available); load average {fmt_load(m['loadavg'])} at start, "
        f"{fmt_load(results['loadavg_end'])} at end; {m['platform']}",
        f"- Python {m['python']}, headroom-ai {m['headroom']}, aiohttp {m['aiohttp']}; hookd pool size {POOL_SIZE}, "
        f"compression mode {results['hookd_mode']}; "
        f"hookd+worker sources sha256 {m['source_digest']}{source_note(results)}",
        "",
    ]


def source_note(results: dict[str, Any]) -> str:
    # Others edit hookd while benchmarks run; a run that straddles an edit measured two versions.
    end = results["source_digest_end"]
    return "" if end == results["machine"]["source_digest"] else f" (**changed during the run**, now {end})"


def render_replay(results: dict[str, Any]) -> list[str]:
    replay, summary = results["replay"], results["replay_summary"]
    rows = replay["per_turn"]
    target_met = summary["ratio"] is not None and summary["ratio"] <= TARGET_RATIO
    return [
        f"## 1. Turn-by-turn replay: `{replay['session']}`",
        "",
        f"{replay['turns']} turns, final request {rows[-1]['request_bytes']:,} bytes. (a) `Engine.compress` "
        "in a spawned child; (b) POST to hookd, timed on the client (aiohttp's default Accept-Encoding, "
        f"`{results['machine']['aiohttp_default_accept_encoding']}`). The two alternate who goes first. "
        "Warm = every turn but the first; p90 is nearest-rank.",
        "",
        "| path | first turn ms | warm median ms | warm p90 ms | warm mean ms |",
        "|---|---:|---:|---:|---:|",
        latency_row("(a) in-process compress", rows[0]["inprocess"]["ms"], summary["inprocess"]),
        latency_row("(b) hookd round trip", rows[0]["hookd"]["rtt_ms"], summary["hookd_rtt"]),
        latency_row("(b) hookd dur_ms (-v)", rows[0]["hookd"]["server"]["dur_ms"], summary["hookd_dur"]),
        latency_row("(b) hookd worker_ms (-v)", rows[0]["hookd"]["server"]["worker_ms"], summary["hookd_worker"]),
        "",
        f"**median(hookd) / median(in-process) = {fmt(summary['ratio'], 2)}** (target <= {TARGET_RATIO}: "
        f"{verdict(target_met)}); over the {summary['large_turns']} warm turns >= {LARGE_BYTES // 1024} KiB: "
        f"{fmt(summary['large_ratio'], 2)}.",
        "",
        *render_breakdown(summary),
        *render_cold(summary["cold"]),
        *render_encodings(summary["encodings"]),
        *render_turns(rows),
    ]


def latency_row(label: str, first: float, stats: dict[str, Any]) -> str:
    return f"| {label} | {first:.1f} | {fmt(stats['median'])} | {fmt(stats['p90'])} | {fmt(stats['mean'])} |"


def render_breakdown(summary: dict[str, Any]) -> list[str]:
    kib = LARGE_BYTES // 1024
    lines = [
        "### Where a hookd round trip goes (warm turns)",
        "",
        "-v fields are whole milliseconds; the means add up to the mean round trip, medians need not.",
        "",
        f"| component | mean ms | median ms | mean ms (>= {kib} KiB) | median ms (>= {kib} KiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in summary["breakdown"].items():
        large = summary["breakdown_large"][name]
        lines.append(
            f"| {name} | {fmt(values['mean'])} | {fmt(values['median'])} | {fmt(large['mean'])} "
            f"| {fmt(large['median'])} |"
        )
    pauses = ", ".join(f"turn {t}: {ms:.0f} ms" for t, ms in summary["inprocess_gc_pauses"].items()) or "none"
    return [*lines, "", f"Full (gen 2) GC pauses inside in-process compress calls: {pauses}.", ""]


def render_cold(cold: dict[str, Any]) -> list[str]:
    return [
        "### Cold vs warm",
        "",
        f"- first turn ({cold['first_turn_bytes']:,} bytes, new to both): in-process "
        f"{cold['first_turn_inprocess_ms']:.1f} ms (of which full GC {cold['first_turn_inprocess_gc_ms']:.0f} ms), "
        f"hookd {cold['first_turn_hookd_rtt_ms']:.1f} ms (worker_ms {cold['first_turn_hookd_worker_ms']:.0f})",
        f"- cold recompress: the final turn ({cold['final_turn_bytes']:,} bytes) under a session id that "
        f"lands on the other worker (slot {cold['spill_slot']}, cold={cold['spill_cold']}), i.e. a spill: "
        f"**{cold['spill_rtt_ms']:.0f} ms** round trip (worker_ms {cold['spill_worker_ms']:.0f}); "
        f"sent there again, now warm: {cold['spill_again_rtt_ms']:.0f} ms",
        f"- the same final turn warm on its own worker: hookd {cold['final_warm_hookd_rtt_ms']:.1f} ms, "
        f"in-process {cold['final_warm_inprocess_ms']:.1f} ms",
        f"- **a spill costs {fmt(cold['spill_vs_warm_median'], 0)}x the warm hookd median and "
        f"{fmt(cold['spill_vs_final_warm'], 0)}x the same turn warm**; the affinity-wait default is "
        f"{cold['affinity_wait_s'] * 1000:.0f} ms",
        "",
    ]


def render_encodings(encodings: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "### Response encoding",
        "",
        "Every turn sent again once per Accept-Encoding, plus once in-process, in rotating order; all are "
        "repeats, so equally warm. Only `modify` answers are big enough to be encoded, so those turns get "
        "their own columns; the delta is the per-turn paired difference to `identity`.",
        "",
        "| variant | answer coding | median ms (warm) | p90 ms (warm) | median ms (modify) | delta vs identity ms "
        "| dur_ms (modify) | write_ms (modify) | answer bytes on the wire (modify) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, stats in encodings.items():
        label = "in-process compress" if variant == "inprocess" else f"hookd, Accept-Encoding: {variant}"
        lines.append(
            f"| {label} | {', '.join(stats['codings']) or '-'} | {fmt(stats['all']['median'])} "
            f"| {fmt(stats['all']['p90'])} | {fmt(stats['modify']['median'])} "
            f"| {fmt(stats['modify_delta_vs_identity_ms'])} | {fmt(stats['modify_dur_ms'])} "
            f"| {fmt(stats['modify_write_ms'])} | {fmt(stats['modify_wire_bytes'], 0)} |"
        )
    return [*lines, ""]


def render_turns(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### Per turn",
        "",
        "| turn | msgs | request bytes | first | in-process ms | hookd rtt ms | dur_ms | worker_ms | read_ms "
        "| write_ms | outcome |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["hookd"]["server"]
        lines.append(
            f"| {r['turn']} | {r['messages']} | {r['request_bytes']:,} | {r['first']} | {r['inprocess']['ms']:.1f} "
            f"| {r['hookd']['rtt_ms']:.1f} | {s['dur_ms']:.0f} | {s['worker_ms']:.0f} | {s['read_ms']:.0f} "
            f"| {s['write_ms']:.0f} | {s['outcome']} |"
        )
    return [*lines, ""]


def render_affinity(results: dict[str, Any]) -> list[str]:
    a, b = results["pair"]
    lines = [
        "## 2. Two sessions, pool of 2",
        "",
        f"`{a['name']}` ({a['turns']} turns, slot {a['slot']}) and `{b['name']}` ({b['turns']} turns, "
        f"slot {b['slot']}). Sequential: one request in flight, A1 B1 A2 B2 ...; concurrent: one client per "
        "session, each waiting for its answer before its next turn. Hit rate from `affinity=hit|spill`; "
        "warm = `cold=false`; warm, same worker and latency are over turns after a session's first.",
        "",
        "| affinity | mode | turns | requests | hits | spills | hit rate | warm | same worker | median rtt ms "
        "| p90 rtt ms | median worker_ms | max wait_ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["affinity_summary"]:
        start, stop = s["turns"]
        lines.append(
            f"| {'on' if s['affinity'] else 'off'} | {s['mode']} | {start}-{'end' if stop is None else stop - 1} "
            f"| {s['requests']} | {s['hits']} | {s['spills']} | {pct(s['hit_rate'])} | {pct(s['warm_rate'])} "
            f"| {pct(s['same_worker_rate'])} | {fmt(s['rtt']['median'])} | {fmt(s['rtt']['p90'])} "
            f"| {fmt(s['worker']['median'])} | {fmt(s['max_wait_ms'], 0)} |"
        )
    rates = [s["hit_rate"] for s in results["affinity_summary"] if s["affinity"]]
    passed = all(rate is not None and rate >= TARGET_HIT_RATE for rate in rates)
    return [*lines, "", f"Affinity hit rate target >= {TARGET_HIT_RATE:.0%}: {verdict(passed)}.", ""]


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a small session and {QUICK_TURNS} turns per session")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<timestamp>/)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="replay through hookd in plain mode (whole history compressed every turn, as tsheadroom does)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    started = time.time()
    rows = manifest_rows()
    cap = QUICK_TURNS if args.quick else None
    replay_session = load_session(pick_replay(rows, args.quick), cap)
    pair = [load_session(name, cap) for name in pick_pair(rows)]
    results: dict[str, Any] = {
        "quick": args.quick,
        "hookd_mode": "plain" if args.plain else "default",
        "command": shlex.join([sys.executable, "-m", "bench.replay", *argv]),
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": machine_info(),
        "pair": [{"name": s.name, "turns": s.turns, "slot": s.slot} for s in pair],
    }
    results["replay"] = run_replay(replay_session, history="plain" if args.plain else None)
    results["affinity"] = run_affinity(*pair, quick=args.quick)
    results["replay_summary"] = replay_summary(results["replay"])
    results["affinity_summary"] = [scenario_summary(s) for s in results["affinity"]]
    results["loadavg_end"] = os.getloadavg()
    results["source_digest_end"] = source_digest()
    results["wall_s"] = time.time() - started
    return results


def write(results: dict[str, Any], markdown: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    (out / "report.md").write_text(markdown)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not corpus.available():
        print(f"bench.replay: {corpus.why_missing()}", file=sys.stderr)
        return 2
    out = args.out or RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    results = run(args, argv)
    markdown = render(results)
    write(results, markdown, out)
    print(markdown)
    print(f"results: {out}", file=sys.stderr)
    return 0


# Guarded: the spawn context re-imports this module in the in-process child.
if __name__ == "__main__":
    sys.exit(main())
