"""From raw rows to the figures the report shows: per contender, ratios, and the four headline ratios.

This module owns every number derived from `results.json`'s raw rows, so the report and the test
read the same figures. "Warm" turns are all but a session's first; saturation is the concurrency
with the highest throughput.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.stats import ratio, spread

FLOOR, PROXY = "inprocess", "proxy"
TARGETS = {"floor_ratio": 1.2, "affinity_ratio": 0.3, "throughput_ratio": 1.5}


def by_contender(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["contender"]].append(row)
    return grouped


def replay_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    warm = [r for r in rows if r["turn"] > 0 and r["ok"]]
    counted = [r for r in rows if "tokens_before" in r]
    before = sum(r["tokens_before"] for r in counted)
    after = sum(r["tokens_after"] for r in counted)
    return {
        "first_ms": rows[0]["ms"] if rows else None,
        "warm": spread([r["ms"] for r in warm]),
        "cpu_ms": spread([r["cpu_ms"] for r in rows]),
        "errors": sum(not r["ok"] for r in rows),
        "answers_with_markers": sum(r["markers"] for r in rows),
        "tokens_before": before,
        "tokens_saved": before - after,
        "saved_share": (before - after) / before if before else None,
        "final_turn_saved_share": final_share(counted),
    }


def final_share(rows: list[dict[str, Any]]) -> float | None:
    if not rows:
        return None
    last = max(rows, key=lambda r: r["turn"])
    return (last["tokens_before"] - last["tokens_after"]) / last["tokens_before"] if last["tokens_before"] else None


def size_figures(rows: list[dict[str, Any]], size_bytes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per size class and request coding: the first send (cold) and the median of the repeats."""
    label_of = {size: label for label, size in size_bytes.items()}
    cells: dict[str, dict[str, Any]] = defaultdict(dict)
    for key in {(label_of[r["request_bytes"]], r["coding"]) for r in rows}:
        label, coding = key
        matching = [r for r in rows if label_of[r["request_bytes"]] == label and r["coding"] == coding]
        repeats = [r["ms"] for r in matching if r["repeat"] > 0 and r["ok"]]
        cells[label][coding] = {
            "cold_ms": min((r["ms"] for r in matching if r["repeat"] == 0), default=None),
            "p50": statistics.median(repeats) if repeats else None,
            "errors": sum(not r["ok"] for r in matching),
        }
    return cells


def level_figures(block: dict[str, Any], largest: str) -> dict[str, Any]:
    rows = block["rows"]
    ok = [r["ms"] for r in rows if r["ok"]]
    largest_warm = [r["ms"] for r in rows if r["session"] == largest and r["turn"] > 0 and r["ok"]]
    served = [r.get("server", {}) for r in rows if r["session"] == largest and r["turn"] > 0]
    return {
        "concurrency": block["concurrency"],
        "throughput_rps": block["throughput_rps"],
        "latency": spread(ok),
        "cpu_ms_per_request": block["cpu_ms_per_request"],
        "errors": block["errors"],
        "largest_warm": spread(largest_warm),
        "largest_cold_turns": sum(bool(s.get("cold")) for s in served) if any(served) else None,
    }


def interleaved_figures(blocks: list[dict[str, Any]], largest: str) -> dict[str, Any]:
    levels = [level_figures(b, largest) for b in blocks]
    return {"levels": levels, "fixed": levels[0], "saturation": max(levels, key=lambda x: x["throughput_rps"])}


def contender_figures(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    replay = by_contender(results["replay"])
    sizes = by_contender(results["sizes"])
    largest = results["replay_session"]
    figures = {}
    for key in results["labels"]:
        starts = results["startup"].get(key, [])
        figures[key] = {
            "replay": replay_figures(replay.get(key, [])),
            "sizes": size_figures(sizes.get(key, []), results["size_bytes"]),
            "interleaved": interleaved_figures(results["interleaved"]["blocks"][key], largest),
            "startup_s": statistics.median(s["first_answer_s"] for s in starts) if starts else None,
            "startup": starts,
            "peak_rss_mb": results["peak_rss_mb"].get(key),
        }
    return figures


def relative(figures: dict[str, dict[str, Any]], base: str) -> dict[str, dict[str, float | None]]:
    """Each contender against `base`: latency and CPU as a multiple, throughput as a multiple."""
    b = figures[base]
    out = {}
    for key, f in figures.items():
        out[key] = {
            "replay_p50": ratio(f["replay"]["warm"]["p50"], b["replay"]["warm"]["p50"]),
            "replay_p99": ratio(f["replay"]["warm"]["p99"], b["replay"]["warm"]["p99"]),
            "throughput": ratio(
                f["interleaved"]["saturation"]["throughput_rps"], b["interleaved"]["saturation"]["throughput_rps"]
            ),
            "saturation_p99": ratio(
                f["interleaved"]["saturation"]["latency"]["p99"], b["interleaved"]["saturation"]["latency"]["p99"]
            ),
            "cpu_per_request": ratio(
                f["interleaved"]["saturation"]["cpu_ms_per_request"],
                b["interleaved"]["saturation"]["cpu_ms_per_request"],
            ),
        }
    return out


def headline(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def warm_p50(key: str) -> float | None:
        return figures[key]["replay"]["warm"]["p50"]

    def largest_fixed(key: str) -> float | None:
        return figures[key]["interleaved"]["fixed"]["largest_warm"]["p50"]

    def saturation(key: str, field: str) -> float | None:
        sat = figures[key]["interleaved"]["saturation"]
        return sat["throughput_rps"] if field == "throughput" else sat["latency"]["p99"]

    return {
        "floor_ratio": {m: ratio(warm_p50(k), warm_p50(FLOOR)) for m, k in MODES.items()},
        "affinity_ratio": {m: ratio(largest_fixed(k), largest_fixed(k + "_noaff")) for m, k in MODES.items()},
        "throughput_ratio": {
            m: ratio(saturation(k, "throughput"), saturation(PROXY, "throughput")) for m, k in MODES.items()
        },
        "p99_ratio": {m: ratio(saturation(k, "p99"), saturation(PROXY, "p99")) for m, k in MODES.items()},
    }


MODES = {"sticky": "hookd", "plain": "hookd_plain"}


def met(name: str, value: float | None) -> bool | None:
    if value is None or name not in TARGETS:
        return None
    return value >= TARGETS[name] if name == "throughput_ratio" else value <= TARGETS[name]


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    figures = contender_figures(results)
    heads = headline(figures)
    return {
        "contenders": figures,
        "vs_floor": relative(figures, FLOOR),
        "vs_proxy": relative(figures, PROXY),
        "headline": heads,
        "targets_met": {name: {m: met(name, v) for m, v in values.items()} for name, values in heads.items()},
    }
