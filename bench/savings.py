"""Does `hookd savings` report what hookd saved? The corpus through hookd, with the provider's bill
after every request, against the savings `bench.cache` measures.

    python -m bench.savings [--quick] [--sessions a,b] [--mode auto] [--clocks warm,gaps] [--out DIR]

Every corpus session is replayed turn by turn through hookd in this process (`bench.inprocess`,
the real front end and real workers on the replayed clock), each session under one of a few
users. After each request, `bench.billing` (the provider model `bench.cache` bills with) bills
what hookd sent, and that bill goes to hookd's `/events` as the `entire_request` event a provider's
stream would produce (`tests.aperture_events`: Anthropic's SSE events, OpenAI's final chunk). The
same requests as the client sent them are billed on a second provider model: the bill without
hookd. At the end, `hookd savings URL --json` reads hookd's counters, and its per-user and
per-model savings (estimated without hookd minus billed) are compared with the true ones (the
no-hook bill minus the policy's bill, as `bench.cache` computes them).

Where they differ, the report splits the difference by the estimator's terms: for each request,
what the estimate put in each kind (input, cache read, cache write) against what the no-hook bill
had there, and hookd's count of the tokens it removed against the provider tokenizer's count.
Its last column gives the estimator the provider's count instead (which only a benchmark knows):
what difference is left there is the estimator's own arithmetic, the rest is token counting.
Exit status 0 when every figure `hookd savings` printed is within 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench import billing
from bench.cache import QUICK_SESSIONS, SESSION_SPACING_S, calls_of, chosen_sessions, times
from bench.inprocess import Clock, Served, served
from hookd.estimator import without_hookd
from hookd.ledger import Facts
from hookd.prices import DEFAULT_TABLE, Usage, resolve
from tests import aperture_events, client, corpus

USERS = ("ana@example.com", "ben@example.com", "cyd@example.com")
KINDS = ("input", "cache_read", "cache_write", "cache_write_long")
AGREEMENT = 0.01


@dataclass
class Terms:
    """One (user, model) group's sums, for explaining a difference."""

    requests: int = 0
    billed: float = 0.0  # the policy's bill, input-token equivalents
    none: float = 0.0  # the no-hook bill
    estimated: float = 0.0  # the estimator's no-hook bill from the facts hookd recorded
    in_provider_tokens: float = 0.0  # the same with the removed tokens counted by the provider
    # How far the estimate with provider counts may be off by rounding alone: automatic caches read
    # in steps of 128 tokens (the step can fall at a different token in each bill), and splitting
    # the provider's count as hookd split its own rounds half a token between read and written.
    rounding: float = 0.0
    kind_error: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    removed_hookd: int = 0  # tokens removed, by hookd's count
    removed_provider: int = 0  # the same, by the provider tokenizer (no-hook minus policy tokens billed)

    @property
    def saved(self) -> float:
        return self.none - self.billed


@dataclass
class Replay:
    url: str
    groups: dict[tuple[str, str], Terms] = field(default_factory=lambda: defaultdict(Terms))
    events: int = 0


def user_of(index: int) -> str:
    return USERS[index % len(USERS)]


def shape_of(provider: str) -> str:
    return "anthropic-stream" if provider == "anthropic" else "openai-stream"


async def replay(
    hookd: Served, sessions: list[dict[str, Any]], clock_kind: str, clock: Clock, meter: billing.Meter, run: Replay
) -> None:
    """Every session turn by turn, each request billed with and without hookd and reported to it."""
    base = 0.0
    async with aiohttp.ClientSession() as http:
        for number, session in enumerate(sessions):
            prices = resolve(DEFAULT_TABLE, session["provider"], session["model"])
            hooked, plain = billing.Provider(prices, meter), billing.Provider(prices, meter)
            user = user_of(number)
            at = times(session, clock_kind)
            for index, call in enumerate(calls_of(session)):
                clock.now = base + at[index]
                request_id = f"{clock_kind}-{session['name']}-{index}"
                call["metadata"].update(request_id=request_id, login_name=user)
                answer = await hookd.send(call)
                body = call["request_body"]
                facts = _facts(hookd, request_id)
                bill = hooked.bill(body, answer.messages, clock.now)
                none = plain.bill(body, body["messages"], clock.now)
                document = aperture_events.event(
                    shape_of(session["provider"]), request_id, bill, session["provider"], session["model"], user
                )
                status, _, _ = await client.post(http, hookd.url + "events", document)
                assert status == 200, status
                run.events += 1
                _account(run.groups[(user, session["model"])], prices, bill, none, facts)
            base += at[-1] + SESSION_SPACING_S


def _facts(hookd: Served, request_id: str) -> Facts | None:
    entry = hookd.hook.ledger.entries.get(request_id)
    return entry[1] if entry else None


def _account(terms: Terms, prices: Any, bill: Usage, none: Usage, facts: Facts | None) -> None:
    terms.requests += 1
    terms.rounding += 0.5 * (prices.write_long - prices.read)
    if not prices.breakpoints:
        terms.rounding += (billing.STEP - 1) * (1 - prices.read)
    terms.billed += bill.cost(prices)
    terms.none += none.cost(prices)
    estimate = without_hookd(bill, facts, prices) if facts is not None else bill
    terms.estimated += estimate.cost(prices)
    if facts is not None:
        terms.removed_hookd += facts.removed_cached + facts.removed_new
        # The same estimate from the provider tokenizer's count of what hookd removed (which only
        # the benchmark knows: the two bills' totals differ by it).
        scale = (none.total - bill.total) / max(1, facts.removed_cached + facts.removed_new)
        exact = replace(facts, removed_cached=round(facts.removed_cached * scale))
        exact = replace(exact, removed_new=none.total - bill.total - exact.removed_cached)
        terms.in_provider_tokens += without_hookd(bill, exact, prices).cost(prices)
    else:
        terms.in_provider_tokens += bill.cost(prices)
    terms.removed_provider += none.total - bill.total
    weights = {"input": 1.0, "cache_read": prices.read, "cache_write": prices.write}
    weights["cache_write_long"] = prices.write_long
    for kind in KINDS:
        terms.kind_error[kind] += weights[kind] * (getattr(estimate, kind) - getattr(none, kind))


async def reported(url: str) -> dict[str, Any]:
    """What `hookd savings URL --json` prints."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hookd", "savings", url, "--json", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"hookd savings exited {process.returncode}")
    return dict(json.loads(out))


async def settled(url: str, events: int) -> None:
    """Until hookd has counted every event sent (each is counted just after its answer)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(500):
            async with http.get(url + "metrics") as response:
                text = await response.text()
            counted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("hookd_usage_events_total")
            )
            if counted >= events:
                return
            await asyncio.sleep(0.01)
    raise RuntimeError(f"hookd counted {counted} of {events} events")


async def measure(sessions: list[dict[str, Any]], mode: str, clock_kind: str) -> tuple[Replay, dict[str, Any]]:
    """One clock's replay on a hookd of its own (as bench.cache does), and what it reports."""
    meter = billing.Meter()
    clock = Clock()
    async with served(mode, clock) as hookd:
        run = Replay(hookd.url)
        await replay(hookd, sessions, clock_kind, clock, meter, run)
        await settled(hookd.url, run.events)
        return run, await reported(hookd.url)


def compare(run: Replay, printed: dict[str, Any], clock_kind: str) -> list[dict[str, Any]]:
    """Per (user, model) and per user, per model and overall: hookd's savings against the truth."""
    rows = {(r["user"], r["model"]): r for r in printed["observed"]}
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for user, model in run.groups:
        for key in ((user, model), (user, "all"), ("all", model), ("all", "all")):
            groups[key].append((user, model))
    out = []
    for (user, model), members in sorted(groups.items()):
        truth = Terms()
        hookd_saved = 0.0
        for member in members:
            terms = run.groups[member]
            row = rows.get(member, {"saved": 0.0})
            hookd_saved += row["saved"]
            truth.requests += terms.requests
            truth.billed += terms.billed
            truth.none += terms.none
            truth.estimated += terms.estimated
            truth.in_provider_tokens += terms.in_provider_tokens
            truth.rounding += terms.rounding
            truth.removed_hookd += terms.removed_hookd
            truth.removed_provider += terms.removed_provider
            for kind in KINDS:
                truth.kind_error[kind] += terms.kind_error[kind]
        out.append(
            {
                "clock": clock_kind,
                "user": user,
                "model": model,
                "requests": truth.requests,
                "bench_saved": truth.saved,
                "hookd_saved": hookd_saved,
                "difference": _share(hookd_saved, truth.saved),
                "no_hook_bill": truth.none,
                "structure_difference": _share(truth.in_provider_tokens - truth.billed, truth.saved),
                "structure_error": truth.in_provider_tokens - truth.billed - truth.saved,
                "rounding": truth.rounding,
                "kind_error": truth.kind_error,
                "removed_hookd": truth.removed_hookd,
                "removed_provider": truth.removed_provider,
            }
        )
    return out


def _share(estimate: float, truth: float) -> float:
    return (estimate - truth) / truth if truth else 0.0


def report(rows: list[dict[str, Any]], command: str, seconds: float) -> str:
    lines = [
        "# hookd savings against bench.cache",
        "",
        f"- command: `{command}`; took {seconds:.0f} s",
        "- saved: input-token equivalents; difference: (hookd's - bench's) / bench's",
        "- estimate error by kind: the estimate minus the no-hook bill, summed over requests, weighted by price",
        "- removed: tokens hookd says it removed, and the no-hook bill's input tokens minus the policy's",
        "- with provider counts: the difference when the estimator is given the provider tokenizer's count of the",
        "  tokens hookd removed (split as hookd split them): what is left is the estimator's own arithmetic",
        "",
        "| clock | user | model | requests | bench saved | hookd saved | difference | error input / read / write 5m / "
        "write 1h | removed (hookd / provider) | with provider counts |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in rows:
        errors = " / ".join(f"{row['kind_error'][k]:+,.0f}" for k in KINDS)
        lines.append(
            f"| {row['clock']} | {row['user']} | {row['model']} | {row['requests']} | {row['bench_saved']:,.0f} "
            f"| {row['hookd_saved']:,.0f} | {row['difference']:+.2%} | {errors} "
            f"| {row['removed_hookd']:,} / {row['removed_provider']:,} | {row['structure_difference']:+.2%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.savings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small sessions: {', '.join(sorted(QUICK_SESSIONS))}")
    parser.add_argument("--sessions", help="comma-separated session names (default: the whole corpus)")
    parser.add_argument("--mode", default="auto", help="hookd's history mode (default %(default)s)")
    parser.add_argument(
        "--clocks", default="warm,gaps", help="warm and/or gaps, as in bench.cache (default %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if not corpus.available():
        print(corpus.why_missing(), file=sys.stderr)
        return 2
    sessions = chosen_sessions(args.sessions, args.quick)
    started = time.monotonic()
    rows, printed = [], {}
    for clock_kind in args.clocks.split(","):
        run, printed[clock_kind] = asyncio.run(measure(sessions, args.mode, clock_kind))
        rows += compare(run, printed[clock_kind], clock_kind)
    command = "python -m bench.savings " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, command.strip(), time.monotonic() - started)
    out = args.out or Path("bench/results") / time.strftime("savings-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "printed": printed}, indent=1))
    print(text)
    print(f"written to {out}")
    worst = max(abs(r["difference"]) for r in rows)
    return 0 if worst <= AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(main())
