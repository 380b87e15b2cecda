"""The Markdown report: machine and versions, headline ratios, per-contender tables, closing note.

This module only formats what `bench.summary` computed (plus the raw rows for hookd's own -v
breakdown); it decides nothing.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.summary import FLOOR, MODES, PROXY, TARGETS

HEADLINES = {
    "floor_ratio": "hookd median warm-turn latency / in-process median (replay of the largest session)",
    "affinity_ratio": "hookd with affinity / without: median warm-turn latency of the largest session, interleaved",
    "throughput_ratio": "hookd throughput / headroom proxy throughput at saturation (interleaved)",
    "p99_ratio": "hookd p99 / headroom proxy p99 at saturation (interleaved)",
}


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def verdict(value: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[value]


def render(results: dict[str, Any]) -> str:
    sections = [header, headline, contenders, ratios, levels, sizes, plots, closing]
    return "\n".join(line for section in sections for line in section(results)) + "\n"


def header(results: dict[str, Any]) -> list[str]:
    m, v = results["machine"], results["versions"]
    changed = results["source_digest_end"] != m["source_digest"]
    return [
        f"# hookd against the alternatives{' (--quick)' if results['quick'] else ''}",
        "",
        f"- command: `{results['command']}`; started {results['started']}, took {results['wall_s']:.0f} s",
        f"- machine: {m['cpu_count']} cores ({m['usable_cpus']} usable), {m['mem_total_mib']:,} MiB RAM; load "
        f"average {'/'.join(f'{x:.2f}' for x in m['loadavg'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in results['loadavg_end'])} at end; {m['platform']}",
        f"- versions: Python {m['python']}, " + ", ".join(f"{name} {version}" for name, version in v.items()),
        f"- hookd pool size {results['pool_size']} (the CPU count); hookd+worker sources sha256 {m['source_digest']}"
        + (" (**changed during the run**)" if changed else ""),
        f"- replayed session: `{results['replay_session']}` ({len(rows_of(results, FLOOR))} turns); interleaved: "
        f"{', '.join(f'`{s}`' for s in results['interleaved']['sessions'])}",
        "",
    ]


def rows_of(results: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [r for r in results["replay"] if r["contender"] == key]


def headline(results: dict[str, Any]) -> list[str]:
    s = results["summary"]
    lines = ["## Headline ratios", "", "| ratio | sticky (default) | plain | target |", "|---|---:|---:|---|"]
    for name, text in HEADLINES.items():
        values, met = s["headline"][name], s["targets_met"][name]
        target = TARGETS.get(name)
        bound = "-" if target is None else (f">= {target}" if name == "throughput_ratio" else f"<= {target}")
        cells = " | ".join(f"{fmt(values[m], 2)} ({verdict(met[m])})" for m in MODES)
        lines.append(f"| {text} | {cells} | {bound} |")
    return [*lines, ""]


def contenders(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Per contender",
        "",
        "Replay: the largest session turn by turn, warm = every turn but the first. Saturation: the "
        "interleaved concurrency with the highest throughput. Tokens: o200k_base over each message as "
        "sent upstream, summed over the replay. CPU: the whole process tree's user+system time. RSS: "
        "the process tree's peak, summed over processes. Start-up: from launch until the first answer "
        "to a probe request, alone on the machine; then that probe's latency, and again warm.",
        "",
        "| contender | replay p50 ms | p90 ms | p99 ms | saturation rps | p99 ms at saturation | CPU ms/request "
        "| tokens saved | peak RSS MB | start-up s | 1st / 2nd probe ms | answers with markers | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, f in results["summary"]["contenders"].items():
        warm, sat = f["replay"]["warm"], f["interleaved"]["saturation"]
        probes = f["startup"][-1] if f["startup"] else {}
        errors = f["replay"]["errors"] + sum(level["errors"] for level in f["interleaved"]["levels"])
        lines.append(
            f"| {results['labels'][key]} | {fmt(warm['p50'])} | {fmt(warm['p90'])} | {fmt(warm['p99'])} "
            f"| {fmt(sat['throughput_rps'])} (c={sat['concurrency']}) | {fmt(sat['latency']['p99'])} "
            f"| {fmt(sat['cpu_ms_per_request'])} | {pct(f['replay']['saved_share'])} | {fmt(f['peak_rss_mb'], 0)} "
            f"| {fmt(f['startup_s'])} | {fmt(probes.get('first_ms'), 0)} / {fmt(probes.get('second_ms'), 0)} "
            f"| {f['replay']['answers_with_markers']} | {errors} |"
        )
    return [*lines, ""]


def ratios(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Ratios against the in-process floor and against headroom's proxy",
        "",
        "Latency and CPU: contender / reference (lower is better); throughput: contender / reference "
        "(higher is better). The floor's throughput is one loop in one process.",
        "",
        "| contender | p50 / floor | p99 / floor | rps / floor | p50 / proxy | p99 / proxy (replay) "
        "| rps / proxy | p99 / proxy (saturation) | CPU / proxy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floor, proxy = results["summary"]["vs_floor"], results["summary"]["vs_proxy"]
    for key in results["summary"]["contenders"]:
        f, p = floor[key], proxy[key]
        lines.append(
            f"| {results['labels'][key]} | {fmt(f['replay_p50'], 2)} | {fmt(f['replay_p99'], 2)} "
            f"| {fmt(f['throughput'], 2)} | {fmt(p['replay_p50'], 2)} | {fmt(p['replay_p99'], 2)} "
            f"| {fmt(p['throughput'], 2)} | {fmt(p['saturation_p99'], 2)} | {fmt(p['cpu_per_request'], 2)} |"
        )
    return [*lines, ""]


def levels(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Interleaved sessions by concurrency",
        "",
        f"Each client replays one session at a time, turn by turn. The first concurrency "
        f"({results['interleaved']['concurrencies'][0]}) runs on a fresh instance, so caches start cold; "
        "the others follow on the same instance under new session ids. Largest session: its warm turns; "
        "cold: how many of them hookd served on a worker that had not seen the session (`cold=true`).",
        "",
        "| contender | concurrency | rps | p50 ms | p90 ms | p99 ms | CPU ms/request | largest session p50 ms "
        "| largest session cold turns | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, f in results["summary"]["contenders"].items():
        for level in f["interleaved"]["levels"]:
            lat = level["latency"]
            cold = level["largest_cold_turns"]
            lines.append(
                f"| {results['labels'][key]} | {level['concurrency']} | {fmt(level['throughput_rps'])} "
                f"| {fmt(lat['p50'])} | {fmt(lat['p90'])} | {fmt(lat['p99'])} | {fmt(level['cpu_ms_per_request'])} "
                f"| {fmt(level['largest_warm']['p50'])} | {'-' if cold is None else cold} | {level['errors']} |"
            )
    return [*lines, ""]


def sizes(results: dict[str, Any]) -> list[str]:
    classes = list(results["size_bytes"])
    lines = [
        "## One body per size class, repeated",
        "",
        "Median of the repeats (the first send, cold, in brackets), in ms, per request body coding. "
        "Sizes: " + ", ".join(f"{label} = {size:,} bytes" for label, size in results["size_bytes"].items()) + ".",
        "",
        "| contender | coding | " + " | ".join(classes) + " |",
        "|---|---|" + "---:|" * len(classes),
    ]
    for key, f in results["summary"]["contenders"].items():
        codings = sorted({c for cells in f["sizes"].values() for c in cells})
        for coding in codings:
            cells = [f["sizes"].get(label, {}).get(coding, {}) for label in classes]
            shown = [f"{fmt(c.get('p50'))} ({fmt(c.get('cold_ms'), 0)})" if c else "-" for c in cells]
            lines.append(f"| {results['labels'][key]} | {coding} | " + " | ".join(shown) + " |")
    return [*lines, ""]


def plots(results: dict[str, Any]) -> list[str]:
    return ["## Plots", "", *(f"![{name}]({name})" for name in results["plots"]), ""]


def hookd_breakdown(results: dict[str, Any], key: str) -> dict[str, float]:
    """Median split of hookd's warm replay turns, from its own -v lines."""
    rows = [r for r in rows_of(results, key) if r["turn"] > 0 and r["server"]]
    if not rows:
        return {}

    def med(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "round trip": med([r["ms"] for r in rows]),
        "worker_ms": med([r["server"].get("worker_ms", 0.0) for r in rows]),
        "front end (dur_ms - worker_ms)": med(
            [r["server"]["dur_ms"] - r["server"].get("worker_ms", 0.0) for r in rows]
        ),
        "outside the handler (round trip - dur_ms)": med([r["ms"] - r["server"]["dur_ms"] for r in rows]),
    }


def closing(results: dict[str, Any]) -> list[str]:
    s = results["summary"]
    h, met = s["headline"], s["targets_met"]
    lines = [
        "## Closing note",
        "",
        f"Command: `{results['command']}`.",
        "",
        f"- hookd / in-process median warm turn on `{results['replay_session']}`: "
        f"{fmt(h['floor_ratio']['sticky'], 2)} sticky, {fmt(h['floor_ratio']['plain'], 2)} plain (target <= 1.2).",
        f"- affinity / no affinity, largest session interleaved: {fmt(h['affinity_ratio']['sticky'], 2)} sticky, "
        f"{fmt(h['affinity_ratio']['plain'], 2)} plain (target <= 0.3).",
        f"- throughput hookd / headroom proxy at saturation: {fmt(h['throughput_ratio']['sticky'], 2)} sticky, "
        f"{fmt(h['throughput_ratio']['plain'], 2)} plain (target >= 1.5); p99 hookd / proxy: "
        f"{fmt(h['p99_ratio']['sticky'], 2)} sticky, {fmt(h['p99_ratio']['plain'], 2)} plain.",
        "",
    ]
    for mode, key in MODES.items():
        split = hookd_breakdown(results, key)
        if split:
            parts = ", ".join(f"{name} {value:.1f} ms" for name, value in split.items())
            lines.append(f"Where a warm replay turn goes in hookd {mode} (medians from its -v lines): {parts}.")
    cpu = {k: f["interleaved"]["saturation"]["cpu_ms_per_request"] for k, f in s["contenders"].items()}
    lines += [
        "",
        "CPU per request at saturation (whole process tree): "
        + ", ".join(f"{results['labels'][k]} {fmt(v)} ms" for k, v in cpu.items())
        + f". With {results['pool_size']} cores, throughput cannot exceed cores / CPU per request.",
        "",
        *missed_notes(met),
        *written_notes(results),
    ]
    return lines


def missed_notes(met: dict[str, dict[str, bool | None]]) -> list[str]:
    notes = {
        "floor_ratio": "A missed floor ratio is the front end's share: hookd parses the whole body, frames it "
        "to the worker and the worker's answer back, validates and writes the answer; the split above says "
        "which part grew. Sending only changed messages (sticky) removes most of the worker side.",
        "affinity_ratio": "Affinity pays only when a turn would otherwise land on a worker that has not seen "
        "the conversation. In sticky mode only new messages reach a worker, so any worker is nearly as fast "
        "and the ratio stays near 1 by design; in plain mode a cold worker recompresses the whole history.",
        "throughput_ratio": "Throughput is bounded by CPU per request: compare hookd's with the proxy's above. "
        "The proxy runs compress() in threads of one process; hookd's cost beyond that is JSON decoding and "
        "re-encoding of the whole body in the front end and again in the worker.",
    }
    lines = [notes[name] for name, modes in met.items() if name in notes and False in modes.values()]
    return [*lines, ""] if lines else []


def written_notes(results: dict[str, Any]) -> list[str]:
    written = results.get("written", {}).get(PROXY, [])
    if not written:
        return []
    return [f"headroom proxy, started with `--stateless`, still wrote: {', '.join(f'`{w}`' for w in written)}.", ""]
