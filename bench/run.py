"""`python -m bench [--quick] [--out DIR] [--seed N]`: hookd against the alternatives, side by side.

This module owns the plan of one comparison run and its order: it builds the workloads, starts and
stops the contenders, runs the phases, and writes `results.json`, `report.md` and the plots.

1. Interleaved sessions: for each contender in random order, a fresh instance (its start-up is
   measured), the sessions at the fixed concurrency first (caches cold, as in production), then at
   the other concurrencies under fresh session ids (caches warm alike for every contender).
2. Replay and size classes: every contender started afresh (all at once), then the largest session
   turn by turn and the size classes repeated in each request coding, every request to every
   contender in a fresh random order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import drive, plots, report, summary, workloads
from bench.contenders import Contender, InProcess, all_contenders
from bench.procs import PeakRss
from bench.progress import Progress
from bench.replay import RESULTS_DIR, machine_info, source_digest
from tests import corpus

PROBE_SESSION = "cc-spotter-websearch-plan"


@dataclass(frozen=True)
class Plan:
    replay_turns: int | None
    size_classes: tuple[str, ...]
    size_repeats: int
    sessions: int
    session_turns: int
    concurrencies: tuple[int, ...]  # the first is the fixed one the affinity figure comes from

    @staticmethod
    def make(quick: bool) -> Plan:
        if quick:
            return Plan(12, ("10 KB", "100 KB", "1 MB"), 2, 4, 8, (4,))
        return Plan(None, tuple(workloads.SIZE_CLASSES), 5, 8, 24, (4, 1, 2, 8))


@dataclass(frozen=True)
class Work:
    replay: list[workloads.Call]
    sizes: dict[str, workloads.Call]
    sessions: list[str]
    probe: workloads.Call


def build(plan: Plan) -> Work:
    largest = workloads.largest_session()
    probe = workloads.make_call(workloads.hook_calls(PROBE_SESSION)[-1], PROBE_SESSION, 0, "bench-probe")
    return Work(
        replay=workloads.session_calls(largest, "replay", plan.replay_turns),
        sizes=workloads.size_calls(list(plan.size_classes), "sizes"),
        sessions=workloads.interleaved_names(plan.sessions),
        probe=probe,
    )


def interleaved_calls(work: Work, plan: Plan, tag: str) -> list[list[workloads.Call]]:
    # The largest session keeps all its turns: its warm-turn latency is the affinity figure.
    return [
        workloads.session_calls(name, tag, plan.replay_turns if i == 0 else plan.session_turns)
        for i, name in enumerate(work.sessions)
    ]


def units(plan: Plan, work: Work, contenders: int) -> int:
    """Progress units: interleaved requests, then one per alternating request (all contenders)."""
    per_level = sum(len(s) for s in interleaved_calls(work, plan, "count"))
    alternating = len(work.replay) + len(work.sizes) * plan.size_repeats * len(workloads.CODINGS)
    return contenders * per_level * len(plan.concurrencies) + alternating


async def phase_interleaved(
    plan: Plan, work: Work, progress: Progress, rss: PeakRss, rng: random.Random
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    blocks: dict[str, Any] = {}
    startups: dict[str, list[dict[str, Any]]] = {}
    async with drive.client() as http:
        for contender in rng.sample(all_contenders(), len(all_contenders())):
            progress.advance(0, f"interleaved: {contender.label}")
            startups[contender.key] = [await drive.start_measured(contender, work.probe, http)]
            rss.watch(contender.key, contender.pid)
            try:
                blocks[contender.key] = await run_levels(contender, plan, work, http, progress)
            finally:
                rss.forget(contender.key)
                contender.stop()
    return blocks, startups


async def run_levels(
    contender: Contender, plan: Plan, work: Work, http: aiohttp.ClientSession, progress: Progress
) -> list[dict[str, Any]]:
    # The floor is one loop in one process, with no concurrency to vary: it runs once cold and, like
    # the others' later levels, once more warm under new session ids.
    floor = isinstance(contender, InProcess)
    levels = (1,) * min(2, len(plan.concurrencies)) if floor else plan.concurrencies
    results = []
    for level in levels:
        sessions = interleaved_calls(work, plan, f"c{level}")
        results.append(await drive.concurrent(contender, sessions, level, http, progress))
    if floor:
        progress.advance(sum(len(s) for s in sessions) * (len(plan.concurrencies) - len(levels)))
    return results


async def phase_alternating(
    plan: Plan, work: Work, progress: Progress, rss: PeakRss, rng: random.Random
) -> dict[str, Any]:
    contenders = rng.sample(all_contenders(), len(all_contenders()))
    tokens = drive.Tokens()
    async with drive.client() as http:
        try:
            progress.advance(0, "starting every contender")
            # At once: start-up was measured in the first phase, one contender at a time.
            await asyncio.gather(*(asyncio.to_thread(c.start) for c in contenders))
            for contender in contenders:
                rss.watch(contender.key, contender.pid)
            progress.advance(0, "replay, turn by turn")
            replay = [(call, "identity", 0) for call in work.replay]
            replay_rows = await drive.alternate(contenders, replay, http, progress, rng, tokens)
            progress.advance(0, "size classes")
            sizes = [
                (c, coding, r)
                for c in work.sizes.values()
                for r in range(plan.size_repeats)
                for coding in workloads.CODINGS
            ]
            size_rows = await drive.alternate(contenders, sizes, http, progress, rng)
        finally:
            for contender in contenders:
                rss.forget(contender.key)
                contender.stop()
    written = {c.key: getattr(c, "written", []) for c in contenders}
    return {"replay": replay_rows, "sizes": size_rows, "written": written}


async def measure(plan: Plan, work: Work, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    progress = Progress(units(plan, work, len(all_contenders())))
    with PeakRss() as rss:
        blocks, startups = await phase_interleaved(plan, work, progress, rss, rng)
        alternating = await phase_alternating(plan, work, progress, rss, rng)
    progress.close()
    return {
        "interleaved": {"sessions": work.sessions, "concurrencies": plan.concurrencies, "blocks": blocks},
        **alternating,
        "startup": startups,
        "peak_rss_mb": {key: value / 2**20 for key, value in rss.peaks.items()},
        "labels": {c.key: c.label for c in all_contenders()},
    }


def versions() -> dict[str, str]:
    names = ["headroom-ai", "aiohttp", "orjson", "psutil", "matplotlib", "tiktoken", "hookd"]
    return {name: metadata.version(name) for name in names}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, one concurrency (< 2 min)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<timestamp>/)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the contenders' random order")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not corpus.available():
        print(f"bench: {corpus.why_missing()}", file=sys.stderr)
        return 2
    started = time.time()
    out = args.out or RESULTS_DIR / time.strftime("compare-%Y%m%d-%H%M%S")
    plan = Plan.make(args.quick)
    results: dict[str, Any] = {
        "quick": args.quick,
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": machine_info(),
        "versions": versions(),
        "pool_size": os.cpu_count(),
        "plan": plan.__dict__,
    }
    work = build(plan)
    results |= asyncio.run(measure(plan, work, args.seed))
    results["replay_session"] = work.replay[0].session
    results["size_bytes"] = {label: call.size for label, call in work.sizes.items()}
    results["loadavg_end"] = os.getloadavg()
    results["source_digest_end"] = source_digest()
    results["wall_s"] = time.time() - started
    results["summary"] = summary.summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots.draw(results, out)
    (out / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    markdown = report.render(results)
    (out / "report.md").write_text(markdown)
    print(markdown)
    print(f"bench: {time.time() - started:.0f} s; results in {out}", file=sys.stderr)
    return 0
