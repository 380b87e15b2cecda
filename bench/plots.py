"""The report's three pictures, drawn with matplotlib (headless) from the raw results.

- latency against conversation size (the replay's turns);
- throughput against concurrency (the interleaved sessions; the floor as a line at its one loop);
- latency per turn of the growing session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server, and none needed for PNG files

import matplotlib.pyplot as plt

from bench.summary import FLOOR, by_contender


def draw(results: dict[str, Any], out: Path) -> list[str]:
    drawn = [
        latency_vs_size(results, out / "latency_vs_size.png"),
        throughput_vs_concurrency(results, out / "throughput_vs_concurrency.png"),
        latency_per_turn(results, out / "latency_per_turn.png"),
    ]
    plt.close("all")
    return [path.name for path in drawn]


def latency_vs_size(results: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for key, rows in by_contender(results["replay"]).items():
        ordered = sorted(rows, key=lambda r: r["request_bytes"])
        axes.plot(
            [r["request_bytes"] / 1e3 for r in ordered], [r["ms"] for r in ordered], ".-", label=label(results, key)
        )
    axes.set(xscale="log", yscale="log", xlabel="request size (KB)", ylabel="latency (ms)")
    return save(figure, axes, f"Latency against conversation size: {results['replay_session']}", path)


def throughput_vs_concurrency(results: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for key, blocks in results["interleaved"]["blocks"].items():
        if key == FLOOR:
            best = max(b["throughput_rps"] for b in blocks)
            axes.axhline(best, linestyle="--", color="grey", label=label(results, key))
            continue
        ordered = sorted(blocks, key=lambda b: b["concurrency"])
        axes.plot(
            [b["concurrency"] for b in ordered], [b["throughput_rps"] for b in ordered], "o-", label=label(results, key)
        )
    axes.set(xlabel="concurrent sessions", ylabel="requests per second", ylim=(0, None))
    title = f"Throughput, {len(results['interleaved']['sessions'])} interleaved sessions, pool {results['pool_size']}"
    return save(figure, axes, title, path)


def latency_per_turn(results: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for key, rows in by_contender(results["replay"]).items():
        axes.plot([r["turn"] for r in rows], [r["ms"] for r in rows], ".-", label=label(results, key))
    axes.set(yscale="log", xlabel="turn", ylabel="latency (ms)")
    return save(figure, axes, f"Latency per turn of a growing session: {results['replay_session']}", path)


def label(results: dict[str, Any], key: str) -> str:
    return str(results["labels"][key])


def save(figure: Any, axes: Any, title: str, path: Path) -> Path:
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
