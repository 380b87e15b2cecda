"""Figures for the reliability report, and the measurements every reliability test takes.

Each test of test_faults, test_hostile and test_load records what it saw (requests sent, faults
injected, answers outside the contract, recovery times, memory growth, latency percentiles) with
`record()`. Records are merged per test into one JSON file: `$HOOKD_REPORT`, else
`reliability-report.json` in pytest's rootdir. Merging is a locked read-modify-write, so one run
(or several) leaves one file with the latest figures of every test.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_NAME = "reliability-report.json"


def report_path(rootdir: Path) -> Path:
    return Path(os.environ.get("HOOKD_REPORT") or rootdir / DEFAULT_NAME)


def record(request: pytest.FixtureRequest, **figures: Any) -> Path:
    """Merge this test's figures into the report under its node id; returns the report's path."""
    path = report_path(request.config.rootpath)
    entry = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with _locked(path):
        report = _load(path)
        report.setdefault("tests", {})[request.node.nodeid] = entry
        report["updated_at"] = entry["recorded_at"]
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        temporary.replace(path)
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        report = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return report if isinstance(report, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of latencies given in seconds, in milliseconds, rounded for the report."""
    return {
        "p50_ms": round(percentile(seconds, 50) * 1000, 1),
        "p99_ms": round(percentile(seconds, 99) * 1000, 1),
        "max_ms": round(max(seconds, default=math.nan) * 1000, 1),
    }


def rss_mb(pid: int) -> float:
    """A process's resident memory now (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text, 0 when the series has not appeared yet (a labelled
    counter exists only once it has been incremented)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
