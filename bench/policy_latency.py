"""What the history policy costs in latency: the default against sticky mode, side by side.

    python -m bench.policy_latency [--quick] [--out DIR]

Two hookd processes (pool of 2 each), one with the default history policy and one in sticky mode,
get the largest corpus session turn by turn, each turn sent to both in alternating order and
timed on the client. Between turns the replay pauses as an agent would while the model answers
(`THINK_S`), which is when the default makes its rewrite candidates. Reported: the median warm
turn of each and their ratio (target: the default within 1.1x of sticky), and every turn whose
`-v` line says it rewrote history, with its duration and body size (target: under 250 ms at
1 MB). A warm replay rarely goes cold, so at the end both get one more turn after the default's
cache has expired: its price table is given a 1-second TTL, and the replay waits that plus the
cold margin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.replay import LineTap, hookd_turn, largest, load_session, manifest_rows, start_hookd
from hookd.cache_model import COLD_MARGIN_S
from tests import corpus

THINK_S = 0.6
QUICK_TURNS = 12
MB = 1024 * 1024
TARGET_RATIO = 1.1
TARGET_REWRITE_MS = 250.0


async def replay(turns: int | None) -> dict[str, Any]:
    session = load_session(largest(manifest_rows())["name"], turns)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        (Path(a) / "settings.json").write_text(orjson.dumps({"cache_prices": {"anthropic": {"ttl": 1}}}).decode())
        default, _ = start_hookd(a)
        sticky, _ = start_hookd(b, history="sticky")
        try:
            rows = await drive(session, {"default": default, "sticky": sticky})
        finally:
            default.stop()
            sticky.stop()
    return {"session": session.name, "rows": rows}


async def drive(session: Any, servers: dict[str, Any]) -> list[dict[str, Any]]:
    taps = {name: LineTap(server) for name, server in servers.items()}
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for turn, body in enumerate(session.bodies):
            if turn == len(session.bodies) - 1:
                # The last turn comes after the default's (shortened) cache lifetime.
                await asyncio.sleep(1 + COLD_MARGIN_S + 1)
            order = list(servers) if turn % 2 == 0 else list(reversed(servers))
            row: dict[str, Any] = {"turn": turn, "bytes": len(body)}
            for name in order:
                row[name] = await hookd_turn(http, servers[name].url, taps[name], body)
            rows.append(row)
            await asyncio.sleep(THINK_S)
    return rows


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rows = results["rows"]
    warm = rows[1:-1]
    medians = {name: statistics.median(r[name]["rtt_ms"] for r in warm) for name in ("default", "sticky")}
    rewrites = [
        {
            "turn": r["turn"],
            "reason": r["default"]["server"].get("rewrite"),
            "dur_ms": r["default"]["server"].get("dur_ms"),
            "rtt_ms": r["default"]["rtt_ms"],
            "mb": r["bytes"] / MB,
        }
        for r in rows
        if r["default"]["server"].get("rewrite", "-") != "-"
    ]
    return {
        "medians_ms": medians,
        "ratio": medians["default"] / medians["sticky"],
        "rewrites": rewrites,
        "slowest_rewrite_ms": max((r["dur_ms"] for r in rewrites), default=None),
    }


def report(results: dict[str, Any], summary: dict[str, Any], command: str) -> str:
    lines = [
        "# Latency of the history policy: default vs sticky",
        "",
        f"- command: `{command}`; session {results['session']}, {len(results['rows'])} turns, "
        f"{THINK_S} s between turns",
        f"- median warm turn: default {summary['medians_ms']['default']:.1f} ms, "
        f"sticky {summary['medians_ms']['sticky']:.1f} ms; ratio **{summary['ratio']:.2f}** "
        f"(target <= {TARGET_RATIO})",
        "",
        "| turn | rewrite | body MB | hookd dur_ms | client rtt_ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in summary["rewrites"]:
        lines.append(f"| {r['turn']} | {r['reason']} | {r['mb']:.2f} | {r['dur_ms']:.0f} | {r['rtt_ms']:.0f} |")
    if not summary["rewrites"]:
        lines.append("| - | no turn rewrote history | | | |")
    slowest = summary["slowest_rewrite_ms"]
    if slowest is not None:
        lines += ["", f"Slowest rewrite turn: {slowest:.0f} ms (target < {TARGET_REWRITE_MS:.0f} ms at 1 MB)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_TURNS} turns only")
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    if not corpus.available():
        print(corpus.why_missing(), file=sys.stderr)
        return 2
    results = asyncio.run(replay(QUICK_TURNS if args.quick else None))
    summary = summarise(results)
    command = "python -m bench.policy_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, summary, command.strip())
    out = args.out or Path("bench/results") / time.strftime("policy-latency-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1, default=str))
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
