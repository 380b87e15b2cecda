"""Soak: replay the shared corpus through a running hookd for N minutes and watch memory and latency.

    python -m bench.soak --minutes 30                      # against hookd on 127.0.0.1:8080
    python -m bench.soak --minutes 30 --url http://host:8080/
    python -m bench.soak --minutes 5 --spawn --pool-size 2 # start a hookd of its own

Each client replays every corpus session turn by turn, in a loop; every pass gives the sessions
new ids, so hookd sees a steady stream of new conversations, as in production. Every --interval
seconds it samples the resident memory of the front end and of each worker (the front end is the
workers' parent; run on the same machine as hookd), the memory held for conversations (sticky
records, bounded by --sticky-max-mb) and the latency of the requests answered since the last
sample, and prints one line. At the end it prints a summary and writes everything
as JSON (default bench/results/soak-<time>.json). Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests import client, corpus, report
from tests.hookd_process import Hookd

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long to run")
    parser.add_argument("--url", default="http://127.0.0.1:8080/", help="a running hookd (default %(default)s)")
    parser.add_argument("--spawn", action="store_true", help="start a hookd of its own instead of using --url")
    parser.add_argument("--pool-size", type=int, default=2, help="workers of a --spawn hookd (default %(default)s)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent replays (default %(default)s)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default %(default)s)")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/soak-<time>.json)")
    return parser.parse_args(argv)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def processes(url: str) -> dict[str, int]:
    """'front' and 'worker<slot>' -> pid, from /readyz and the workers' parent."""
    workers = {f"worker{w['slot']}": w["pid"] for w in orjson.loads(get(url + "readyz")[1])["workers"] if "pid" in w}
    if not workers:
        return {}
    status = Path(f"/proc/{next(iter(workers.values()))}/status").read_text()
    parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return {"front": parent, **workers}


class Soak:
    def __init__(self, url: str, calls: list[list[dict[str, Any]]], clients: int) -> None:
        self.url = url
        self.calls = calls
        self.clients = clients
        self.window: list[float] = []  # latencies since the last sample
        self.latencies: list[float] = []
        self.answers: Counter[str] = Counter()
        self.samples: list[dict[str, Any]] = []

    async def replay(self, number: int, deadline: float) -> None:
        async with aiohttp.ClientSession() as session:
            for lap in itertools.count():
                for index in range(number, number + len(self.calls)):
                    for call in self.calls[index % len(self.calls)]:
                        if time.monotonic() >= deadline:
                            return
                        session_id = f"{call['metadata']['session_id']}-pass{lap}-client{number}"
                        body = orjson.dumps({**call, "metadata": {**call["metadata"], "session_id": session_id}})
                        await self.send(session, body)

    async def send(self, session: aiohttp.ClientSession, body: bytes) -> None:
        started = time.monotonic()
        try:
            status, _, answer = await client.post(session, self.url, body, headers={"Accept-Encoding": "gzip"})
            kind = answer.get("action", "?") if status == 200 and isinstance(answer, dict) else f"http {status}"
        except (aiohttp.ClientError, ValueError) as exc:
            kind = type(exc).__name__
        seconds = time.monotonic() - started
        self.window.append(seconds)
        self.latencies.append(seconds)
        self.answers[kind] += 1

    async def sample(self, began: float, deadline: float, interval: float) -> None:
        while True:
            rss = {}
            for name, pid in processes(self.url).items():
                with contextlib.suppress(OSError, ValueError):
                    rss[name] = round(report.rss_mb(pid), 1)
            window, self.window = self.window, []
            # The front end's one large, bounded (--sticky-max-mb) use of memory: growth beyond
            # it is what a soak looks for.
            sticky_mb = report.metric(get(self.url + "metrics")[1].decode(), "hookd_sticky_bytes") / 2**20
            row = {"t_s": round(time.monotonic() - began, 1), "rss_mb": rss, "sticky_mb": round(sticky_mb, 1)}
            row["requests"] = len(window)
            row.update(report.latency_ms(window) if window else {})
            self.samples.append(row)
            memory = " ".join(f"{name}={mb:.0f}" for name, mb in rss.items())
            latency = f"p50={row.get('p50_ms', 0):6.0f} ms  p99={row.get('p99_ms', 0):6.0f} ms"
            print(
                f"{row['t_s']:7.1f}s  {len(window):4d} req  {latency}  rss MB: {memory} (sticky {sticky_mb:.0f})",
                flush=True,
            )
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def summary(soak: Soak, before: str, after: str) -> dict[str, Any]:
    """Totals, latency over the whole run, and memory from warm (a quarter of the run in, at most
    a minute) to the end; `plateau` is the mean of the last quarter of the samples against the
    quarter before (about 0 once memory has stopped growing, as tests/test_load.py judges it)."""
    warm_s = min(60.0, soak.samples[-1]["t_s"] / 4)
    warm = [s for s in soak.samples if s["t_s"] >= warm_s] or soak.samples[-1:]
    memory: dict[str, dict[str, float]] = {}
    for name in warm[0]["rss_mb"]:
        series = [s["rss_mb"][name] for s in warm if name in s["rss_mb"]]
        memory[name] = {"warm": series[0], "max": max(series), "last": series[-1]}
        memory[name]["growth"] = round((series[-1] - series[0]) / series[0], 4)
        whole = [s["rss_mb"][name] for s in soak.samples if name in s["rss_mb"]]
        quarter = max(1, len(whole) // 4)
        previous, last = statistics.fmean(whole[-2 * quarter : -quarter] or whole), statistics.fmean(whole[-quarter:])
        memory[name]["plateau"] = round((last - previous) / previous, 4)
    counters = ("hookd_worker_restarts_total", "hookd_worker_recycles_total")
    outcomes = ("modify", "allow(noop)", "allow(error)", "allow(overload)", "allow(invalid-output)")
    return {
        "requests": len(soak.latencies),
        "answers": dict(soak.answers),
        "latency": report.latency_ms(soak.latencies),
        "rss_mb": memory,
        **{name: report.metric(after, name) - report.metric(before, name) for name in counters},
        "outcomes": {
            name: report.metric(after, "hookd_outcomes_total", outcome=name)
            - report.metric(before, "hookd_outcomes_total", outcome=name)
            for name in outcomes
        },
    }


async def soak(url: str, minutes: float, clients: int, interval: float) -> tuple[Soak, dict[str, Any]]:
    calls = [corpus.hook_calls(session) for session in corpus.sessions()]
    runner = Soak(url, calls, clients)
    before = get(url + "metrics")[1].decode()
    began = time.monotonic()
    deadline = began + minutes * 60
    await asyncio.gather(
        runner.sample(began, deadline, interval), *(runner.replay(n, deadline) for n in range(clients))
    )
    return runner, summary(runner, before, get(url + "metrics")[1].decode())


@contextlib.contextmanager
def hookd(args: argparse.Namespace) -> Iterator[str]:
    if not args.spawn:
        yield args.url
        return
    with tempfile.TemporaryDirectory() as state, Hookd(state_dir=Path(state), pool_size=args.pool_size) as server:
        yield server.url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not corpus.available():
        print(f"bench.soak: {corpus.why_missing()}", file=sys.stderr)
        return 2
    with hookd(args) as url:
        if get(url + "readyz")[0] != 200:
            print(f"bench.soak: {url}readyz is not 200; start hookd first or pass --spawn", file=sys.stderr)
            return 2
        runner, result = asyncio.run(soak(url, args.minutes, args.clients, args.interval))
    out = args.out or RESULTS_DIR / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"url": url, "minutes": args.minutes, "clients": args.clients, "interval_s": args.interval}
    document = {"config": config, "summary": result, "samples": runner.samples}
    out.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
