"""What prompt caching makes of compression: the provider's bill, what the agent could still see,
and whether history changed only when the policy said so.

    python -m bench.cache [--quick] [--sessions a,b] [--modes auto,clear] [--out DIR]

Every corpus session is replayed turn by turn, twice per policy: **warm** (a second between
requests: the provider's cache never expires) and with the session's **recorded gaps**
(`request_times`; sessions without times replay warm), hookd seeing the same clock
(`bench.inprocess`). Policies: no hook; hookd's history modes `sticky`, `plain`, `auto` and
`clear`; and the **oracle** bound, every message sent from its first turn in the form the strong
pipeline gives it in the session's final request (as compressed as headroom makes it knowing the
whole session, and never changed, so perfectly cache-stable).

Each request is billed by `bench.billing` under the provider's real rules (Anthropic breakpoints,
lookback, 5 min / 1 h entries; automatic prefix caching elsewhere) at the prices of
`hookd.prices`; `bench.quality` scores how much of what the agent went on to use from tool output
was still visible, and the first time a span was visible only in output a policy cleared, that
output is charged as a re-read (one more request: the prefix read again from cache, the output
written again), once per output and session. Prefix stability counts the
turns whose already-sent messages changed, by the reason hookd's `-v` line gives (`rewrite=batch`,
`rewrite=cold`, a fresh record) or none ("unexplained", which should never happen).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import billing, quality
from bench.inprocess import Clock, served
from hookd import history, sticky
from hookd.config import COMPRESS_KNOBS, DEFAULTS
from hookd.prices import DEFAULT_TABLE, resolve
from tests import corpus
from worker import frames
from worker import main as worker_main

MODES = ("sticky", "plain", "auto", "clear")
CLOCKS = ("warm", "gaps")
QUICK_SESSIONS = {"cc-reliability-python-to-rust-port", "cc-spotter-fa812bfe-s1", "mini-deepseek-django-14752"}
WARM_GAP_S = 1.0
# Sessions are replayed far apart in time, so no cache outlives its own session.
SESSION_SPACING_S = 10 * 86400.0
REWRITE = re.compile(r"rewrite=(\w+)")
FROZEN = re.compile(r"frozen=(\d+)")


@dataclass
class SessionResult:
    billed: float = 0.0
    usage: billing.Usage = field(default_factory=billing.Usage)
    turns: int = 0
    changes: Counter[str] = field(default_factory=Counter)  # turns that changed sent history, by reason
    score: quality.Score = field(default_factory=quality.Score)
    rereads: int = 0
    reread_cost: float = 0.0

    @property
    def total(self) -> float:
        """The bill with predicted re-reads charged."""
        return self.billed + self.reread_cost

    def as_json(self) -> dict[str, Any]:
        return {
            "billed": self.billed,
            "reread_cost": self.reread_cost,
            "rereads": self.rereads,
            "usage": vars(self.usage),
            "turns": self.turns,
            "changes": dict(self.changes),
            "quality": self.score.as_json(),
        }


class Bill:
    """One session under one policy and clock, fed request by request."""

    def __init__(self, session: dict[str, Any], meter: billing.Meter, spans: list[quality.Span], plain: bool) -> None:
        self.session = session
        self.prices = resolve(DEFAULT_TABLE, session["provider"], session["model"])
        self.provider = billing.Provider(self.prices, meter)
        self.meter = meter
        self.spans: dict[int, list[quality.Span]] = {}
        for span in spans:
            self.spans.setdefault(span.request, []).append(span)
        self.plain = plain
        self.previous: list[bytes] | None = None
        self.unfolded: dict[str, str] = {}
        # An agent that finds an output gone calls the tool again once; from then on it has it.
        self.reread: set[str] = set()
        self.result = SessionResult()

    def take(self, index: int, body: dict[str, Any], sent: list[Any], now: float, line: str = "") -> None:
        usage = self.provider.bill(body, sent, now)
        self.result.usage.add(usage)
        self.result.billed += usage.cost(self.prices)
        self.result.turns += 1
        canonical = [sticky.canonical(m) for m in sent]
        if self.previous is not None and canonical[: len(self.previous)] != self.previous:
            self.result.changes[self._reason(line)] += 1
        self.previous = canonical
        spans = self.spans.get(index)
        if spans:
            self._score(spans, sent, usage)

    def _reason(self, line: str) -> str:
        if self.plain:
            return "plain"
        rewrite = REWRITE.search(line)
        if rewrite and rewrite.group(1) != "-":
            return rewrite.group(1)
        frozen = FROZEN.search(line)
        if frozen and frozen.group(1) == "0":
            return "fresh record"
        return "unexplained"

    def _score(self, spans: list[quality.Span], sent: list[Any], usage: billing.Usage) -> None:
        text = quality.visible_text(sent, self.unfolded)
        cleared = cleared_outputs(sent)
        for span in spans:
            seen = span.text in text
            self.result.score.add(span, seen)
            if not seen and span.source in cleared and span.source not in self.reread:
                self.reread.add(span.source)
                self.result.rereads += 1
                output_tokens = round(cleared[span.source] / history.BYTES_PER_TOKEN)
                self.result.reread_cost += self.prices.read * usage.total + self.prices.write * output_tokens


def cleared_outputs(sent: list[Any]) -> dict[str, int]:
    """Tool results a policy replaced by hookd's note: id -> the cleared output's size."""
    found = {}
    for message in sent:
        for source, content in quality.tool_outputs(message):
            text = content if isinstance(content, str) else ""
            if text.startswith("[hookd cleared"):
                size = re.search(r"lines, (\d+) characters", text)
                found[source] = int(size.group(1)) if size else 0
    return found


def chosen_sessions(names: str | None, quick: bool) -> list[dict[str, Any]]:
    """The sessions named on the command line (comma-separated), else the quick set or all."""
    chosen = set(names.split(",")) if names else QUICK_SESSIONS if quick else None
    return corpus.sessions(chosen)


def times(session: dict[str, Any], clock: str) -> list[float]:
    """When each request is sent: warm, a second apart; else at its recorded time."""
    recorded = corpus.loader().request_times(session) if clock == "gaps" else None
    out: list[float] = []
    for index in range(len(session["turn_ends"])):
        at = recorded[index] if recorded and recorded[index] is not None else None
        out.append(at if at is not None else (out[-1] + WARM_GAP_S if out else 0.0))
    return out


def calls_of(session: dict[str, Any]) -> list[dict[str, Any]]:
    return corpus.hook_calls(session)


# -- the oracle ------------------------------------------------------------------------------


@contextlib.contextmanager
def worker() -> Iterator[socket.socket]:
    """A real hookd worker process (prepared offline and warmed as hookd's are), in frames."""
    ours, theirs = socket.socketpair()
    process = multiprocessing.get_context("spawn").Process(target=worker_main.run, args=(theirs, 0), daemon=True)
    process.start()
    theirs.close()
    try:
        ready = frames.receive(ours)
        if not ready or not ready.get("ready"):
            raise RuntimeError(f"oracle worker did not start: {ready}")
        yield ours
    finally:
        ours.close()
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join()


def finals(sessions: list[dict[str, Any]]) -> dict[str, dict[int, bytes]]:
    """Each session's final request through the strong pipeline: index -> compressed form."""
    knobs = {name: DEFAULTS[name] for name in COMPRESS_KNOBS} | {"protect_recent": 0}
    out = {}
    with worker() as sock:
        for session in sessions:
            messages = [sticky.strip_cache_control(m) for m in calls_of(session)[-1]["request_body"]["messages"]]
            frames.send(sock, {"messages": messages, "model": session["model"], "knobs": knobs, "strong": True})
            reply = frames.receive(sock) or {}
            changed = reply.get("changed", []) if reply.get("ok") and reply.get("tokens_before", 0) > 0 else []
            out[session["name"]] = {index: orjson.dumps(form) for index, form in changed}
    return out


def oracle_sent(compressed: dict[int, bytes], messages: list[Any]) -> list[Any]:
    return [sticky.render(compressed[i], m) if i in compressed else m for i, m in enumerate(messages)]


# -- replays ---------------------------------------------------------------------------------


Results = dict[str, dict[str, dict[str, SessionResult]]]  # run -> clock -> session -> result


async def measure(sessions: list[dict[str, Any]], modes: tuple[str, ...] = MODES) -> Results:
    meter = billing.Meter()
    spans = {s["name"]: quality.evidence(s) for s in sessions}
    results: Results = {}
    compressed = await asyncio.to_thread(finals, sessions)
    for run in ("none", "oracle"):
        for clock in CLOCKS:
            for session in sessions:
                bill = Bill(session, meter, spans[session["name"]], plain=False)
                for index, (call, at) in enumerate(zip(calls_of(session), times(session, clock), strict=True)):
                    sent = call["request_body"]["messages"]
                    if run == "oracle":
                        sent = oracle_sent(compressed[session["name"]], sent)
                    bill.take(index, call["request_body"], sent, at)
                results.setdefault(run, {}).setdefault(clock, {})[session["name"]] = bill.result
    for mode in modes:
        for clock in CLOCKS:
            results.setdefault(mode, {})[clock] = await replay(mode, clock, sessions, meter, spans)
    return results


async def replay(
    mode: str, clock_kind: str, sessions: list[dict[str, Any]], meter: billing.Meter, spans: dict[str, Any]
) -> dict[str, SessionResult]:
    clock = Clock()
    out: dict[str, SessionResult] = {}
    base = 0.0
    async with served(mode, clock) as hookd:
        for session in sessions:
            bill = Bill(session, meter, spans[session["name"]], plain=mode == "plain")
            at = times(session, clock_kind)
            for index, call in enumerate(calls_of(session)):
                clock.now = base + at[index]
                answer = await hookd.send(call)
                bill.take(index, call["request_body"], answer.messages, clock.now, answer.line)
            out[session["name"]] = bill.result
            base += at[-1] + SESSION_SPACING_S
    return out


# -- the report ------------------------------------------------------------------------------


def total(results: Results, run: str, clock: str, names: list[str], charged: bool = True) -> float:
    return sum(results[run][clock][n].total if charged else results[run][clock][n].billed for n in names)


def report(results: Results, sessions: list[dict[str, Any]], command: str, seconds: float) -> str:
    names = [s["name"] for s in sessions]
    runs = [r for r in ("none", *MODES, "oracle") if r in results]
    claude_code = [n for n in names if n.startswith("cc-")]
    lines = [
        "# Prompt-cache cost of compression",
        "",
        f"- command: `{command}`; {len(sessions)} sessions, {sum(len(s['turn_ends']) for s in sessions)} requests; "
        f"took {seconds:.0f} s",
        "- billed input in input-token equivalents under each provider's caching rules (`bench/billing.py`), "
        "predicted re-reads charged; ratios are against no hook",
        "",
        "## Billed input vs no hook",
        "",
        "| sessions | clock | " + " | ".join(runs[1:]) + " |",
        "|---|---|" + "---:|" * (len(runs) - 1),
    ]
    for label, group in (("all", names), ("cc-*", claude_code)):
        if not group:
            continue
        for clock in CLOCKS:
            base = total(results, "none", clock, group)
            cells = " | ".join(f"{total(results, run, clock, group) / base:.3f}" for run in runs[1:])
            lines.append(f"| {label} ({len(group)}) | {clock} | {cells} |")
    lines += ["", *quality_table(results, runs), "", *stability_table(results, runs), ""]
    lines += [
        "## Per session, warm (billed vs no hook)",
        "",
        "| session | no hook | " + " | ".join(runs[1:]) + " |",
        "|---|---:|" + "---:|" * (len(runs) - 1),
    ]
    for name in names:
        base = results["none"]["warm"][name].total
        cells = " | ".join(f"{results[run]['warm'][name].total / base:.3f}" for run in runs[1:])
        lines.append(f"| {name} | {base:,.0f} | {cells} |")
    return "\n".join(lines) + "\n"


def quality_table(results: Results, runs: list[str]) -> list[str]:
    lines = [
        "## What the agent could still see (warm replay)",
        "",
        "| run | evidence visible (by length) | edit old_string visible | predicted re-reads | "
        "lost by age (0-1 / 2-5 / 6-20 / 21+) |",
        "|---|---:|---:|---:|---|",
    ]
    for run in runs:
        score = quality.Score()
        rereads = 0
        for result in results[run]["warm"].values():
            score.merge(result.score)
            rereads += result.rereads
        ages = " / ".join(
            f"{1 - score.by_age.get(b, [0, 0])[0] / max(1, score.by_age.get(b, [0, 1])[1]):.1%}"
            for _, _, b in quality.AGE_BUCKETS
        )
        lines.append(
            f"| {run} | {score.share:.2%} | {score.old_strings_visible}/{score.old_strings} | {rereads} | {ages} |"
        )
    return lines


def stability_table(results: Results, runs: list[str]) -> list[str]:
    lines = [
        "## Changes to already-sent history, by reason",
        "",
        "| run | clock | turns | batch | cold | fresh record | plain | unexplained |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs[1:]:
        for clock in CLOCKS:
            changes: Counter[str] = Counter()
            turns = 0
            for result in results[run][clock].values():
                changes.update(result.changes)
                turns += result.turns
            cells = " | ".join(str(changes.get(k, 0)) for k in ("batch", "cold", "fresh record", "plain"))
            lines.append(f"| {run} | {clock} | {turns} | {cells} | {changes.get('unexplained', 0)} |")
    return lines


def as_json(results: Results) -> dict[str, Any]:
    return {
        run: {clock: {name: r.as_json() for name, r in per.items()} for clock, per in clocks.items()}
        for run, clocks in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small sessions: {', '.join(sorted(QUICK_SESSIONS))}")
    parser.add_argument("--sessions", help="comma-separated session names (default: the whole corpus)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"hookd history modes to run (default: {MODES})")
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if not corpus.available():
        print(corpus.why_missing(), file=sys.stderr)
        return 2
    sessions = chosen_sessions(args.sessions, args.quick)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    out = args.out or Path("bench/results") / time.strftime("cache-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = asyncio.run(measure(sessions, modes))
    command = "python -m bench.cache " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, sessions, command.strip(), time.monotonic() - started)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(as_json(results), indent=1))
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
