"""`hookd savings URL`: what hookd saved, per user and model, read from a running hookd's /metrics.

The figures are the counters of `hookd.usage_metrics`, so they cover what the counters cover:
everything since that hookd started (`process_start_time_seconds`, or when its events process
did, `hookd_usage_counting_since_seconds`, if later), or, with `--since FILE`, the
difference from a snapshot taken earlier with `--save FILE` (save one every Monday, report the
week). A hookd restarted since the snapshot has counted afresh: the report then says so and
covers the time since its start instead. Several replicas each count their own requests: run it
against each, or read the same series from Prometheus (`deploy/`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_S = 10.0
# Series the report reads: the key under which each is summed, and its name in /metrics.
SERIES = {
    "requests": "hookd_usage_requests_total",
    "billed": "hookd_billed_input_weighted_tokens_total",
    "without": "hookd_estimated_input_weighted_tokens_total",
    "billed_kinds": "hookd_billed_input_tokens_total",
    "without_kinds": "hookd_estimated_input_tokens_total",
    "modelled_requests": "hookd_modelled_requests_total",
    "modelled_billed": "hookd_modelled_billed_input_weighted_tokens_total",
    "modelled_without": "hookd_modelled_estimated_input_weighted_tokens_total",
    "modelled_billed_kinds": "hookd_modelled_billed_input_tokens_total",
    "modelled_without_kinds": "hookd_modelled_estimated_input_tokens_total",
}
COUNTING_SINCE = "hookd_usage_counting_since_seconds"
STARTED = ("process_start_time_seconds", COUNTING_SINCE)
Samples = dict[tuple[str, str, str, str], float]  # (series, user, model, kind) -> value


@dataclass
class Row:
    user: str
    model: str
    requests: float = 0.0
    tokens: float = 0.0  # input tokens billed, every kind
    billed: float = 0.0  # the same in input-token equivalents
    without: float = 0.0  # the same requests without hookd (estimated), in input-token equivalents
    read: float = 0.0  # input tokens billed as cache reads
    tokens_without: float = 0.0
    read_without: float = 0.0

    @property
    def saved(self) -> float:
        return self.without - self.billed

    @property
    def saved_share(self) -> float:
        return self.saved / self.without if self.without else 0.0

    @property
    def cache_hit(self) -> float:
        return self.read / self.tokens if self.tokens else 0.0

    @property
    def cache_hit_without(self) -> float:
        return self.read_without / self.tokens_without if self.tokens_without else 0.0

    def add(self, other: Row) -> None:
        for name in NUMBERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_json(self) -> dict[str, Any]:
        derived = ("saved", "saved_share", "cache_hit", "cache_hit_without")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


NUMBERS = ("requests", "tokens", "billed", "without", "read", "tokens_without", "read_without")


@dataclass
class Report:
    window: str
    started: float
    since: float  # the window's start, Unix seconds
    taken: float
    observed: list[Row]  # from the provider's usage (entire_request events)
    modelled: list[Row]  # from the cache model, for requests no event came for

    def as_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "started": self.started,
            "since": self.since,
            "taken": self.taken,
            "observed": [r.as_json() for r in self.observed],
            "observed_total": total(self.observed).as_json(),
            "modelled": [r.as_json() for r in self.modelled],
            "modelled_total": total(self.modelled).as_json(),
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookd savings",
        description="What hookd saved per user and model, from a running hookd's /metrics: requests, input "
        "billed (in input-token equivalents: cache reads at their discount, writes at their premium), "
        "the same requests without hookd (estimated), saved, and the cache hit ratio with and without "
        "hookd. The counters cover the time since that hookd started; for a week's report, save a "
        "snapshot with --save and report against it a week later with --since.",
    )
    parser.add_argument("url", help="hookd's address (http://127.0.0.1:8080/) or its /metrics URL")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--since",
        type=Path,
        metavar="FILE",
        help="report the difference from a snapshot saved earlier with --save (the window is then "
        "from that snapshot to now, unless hookd restarted in between)",
    )
    parser.add_argument("--save", type=Path, metavar="FILE", help="also save this reading as a snapshot for --since")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = fetch(args.url)
    except (OSError, urllib.error.URLError) as exc:
        print(f"hookd savings: cannot read {metrics_url(args.url)}: {exc}", file=sys.stderr)
        return 2
    if COUNTING_SINCE not in text:
        # A page without usage series would report nothing saved, as if that were the truth.
        print(
            f"hookd savings: {metrics_url(args.url)} has no usage series; is it hookd's? (With "
            "--events-listen, its events process may not have answered in time: try again.)",
            file=sys.stderr,
        )
        return 2
    taken = time.time()
    samples, started = read(text)
    baseline: Snapshot | None = None
    if args.since is not None:
        try:
            baseline = load(args.since)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            print(f"hookd savings: cannot read the snapshot {args.since}: {exc!r}", file=sys.stderr)
            return 2
    if args.save is not None:
        rows = [[*key, value] for key, value in samples.items()]
        args.save.write_text(json.dumps({"taken": taken, "started": started, "samples": rows}))
    result = report(samples, started, taken, baseline)
    print(json.dumps(result.as_json(), indent=1) if args.json else render(result))
    return 0


def metrics_url(url: str) -> str:
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def fetch(url: str) -> str:
    with urllib.request.urlopen(metrics_url(url), timeout=TIMEOUT_S) as response:
        return str(response.read().decode())


def read(text: str) -> tuple[Samples, float]:
    """The series the report needs, summed over providers, and when hookd started."""
    wanted = {name: key for key, name in SERIES.items()}
    samples: Samples = defaultdict(float)
    started = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in STARTED:
                started = max(started, sample.value)
            key = wanted.get(sample.name)
            if key is None:
                continue
            labels = sample.labels
            samples[(key, labels.get("user", ""), labels.get("model", ""), labels.get("kind", ""))] += sample.value
    return dict(samples), started


@dataclass
class Snapshot:
    taken: float
    started: float
    samples: Samples


def load(path: Path) -> Snapshot:
    """A snapshot saved by --save."""
    document = json.loads(path.read_text())
    samples = {(str(a), str(b), str(c), str(d)): float(value) for a, b, c, d, value in document["samples"]}
    return Snapshot(float(document["taken"]), float(document["started"]), samples)


def report(samples: Samples, started: float, taken: float, baseline: Snapshot | None) -> Report:
    since = started
    window = f"since hookd started ({_when(started)}), {_span(taken - started)}"
    if baseline is not None:
        if baseline.started == started:
            samples = {key: value - baseline.samples.get(key, 0.0) for key, value in samples.items()}
            since = baseline.taken
            window = f"from the snapshot of {_when(since)} to {_when(taken)}, {_span(taken - since)}"
        else:
            window = (
                f"since hookd started ({_when(started)}), {_span(taken - started)}: it restarted after the "
                "snapshot, so the snapshot's counts are gone"
            )
    return Report(window, started, since, taken, rows(samples, ""), rows(samples, "modelled_"))


def rows(samples: Samples, prefix: str) -> list[Row]:
    table: dict[tuple[str, str], Row] = {}
    for (series, user, model, kind), value in samples.items():
        if not series.startswith(prefix) or (not prefix and series.startswith("modelled_")):
            continue
        field = series[len(prefix) :]
        row = table.setdefault((user, model), Row(user, model))
        if field.endswith("_kinds"):
            without = field.startswith("without")
            _bump(row, "tokens_without" if without else "tokens", value)
            if kind == "cache_read":
                _bump(row, "read_without" if without else "read", value)
        else:
            _bump(row, field, value)
    return sorted((r for r in table.values() if r.requests), key=lambda r: (-r.saved, r.user, r.model))


def _bump(row: Row, field: str, value: float) -> None:
    setattr(row, field, getattr(row, field) + value)


def total(table: list[Row]) -> Row:
    whole = Row("all", "all")
    for row in table:
        whole.add(row)
    return whole


def render(result: Report) -> str:
    lines = [
        f"hookd savings, {result.window}",
        "Input billed in input-token equivalents (cache reads at their discount, writes at their premium).",
        "",
        "From the provider's usage (entire_request events):",
        "",
        *_table(result.observed),
    ]
    if result.modelled:
        lines += ["", "From hookd's cache model, for requests no event came for:", "", *_table(result.modelled)]
    return "\n".join(lines)


def _table(table: list[Row]) -> list[str]:
    head = (
        "| user | model | requests | input tokens | billed | without hookd | saved | saved % "
        "| cache hit | cache hit without hookd |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in [*table, total(table)] if table else []:
        lines.append(
            f"| {row.user} | {row.model} | {row.requests:,.0f} | {row.tokens:,.0f} | {row.billed:,.0f} "
            f"| {row.without:,.0f} | {row.saved:,.0f} | {row.saved_share:.1%} | {row.cache_hit:.1%} "
            f"| {row.cache_hit_without:.1%} |"
        )
    return lines if table else ["(none yet)"]


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(seconds)) if seconds else "unknown"


def _span(seconds: float) -> str:
    days, rest = divmod(max(0, int(seconds)), 86400)
    return f"{days} d {rest // 3600} h" if days else f"{rest // 3600} h {rest % 3600 // 60} min"
