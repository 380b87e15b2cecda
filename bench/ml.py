"""What Kompress costs a worker: resident memory with and without the model, and text-compression
latency per 1,000 tokens on this machine's CPU.

    python -m bench.ml [--quick] [--model-cache DIR] [--out DIR]

Each measurement runs in a fresh process started the way hookd starts a worker (spawn; offline
environment; `worker.ml.load`, then `worker.engine.Engine` and its warm-up), once with `--ml off`
and once with the model, for one ONNX Runtime thread (a full pool on this machine) and for all
CPUs (a pool of one). Prose tool results of several sizes, each made unique so headroom's result
cache cannot answer, are compressed through `Engine.compress`; the latency is the median per size,
and the ML cost is the difference from the same text with the model off.

The real model is used when the cache holds it (`hookd models check`). Otherwise the model is the
stand-in from tests/standin_model.py built at ModernBERT-base's size (~150M parameters, fp32,
random weights): memory and latency are of the right order (fp32 is ~2.3x the size of the int8
file headroom prefers), the compression it does means nothing. `--quick` uses the tiny stand-in
and one repetition, to check the bench itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests import fixtures, standin_model

SIZES_WORDS = (250, 500, 1000, 2000)
REPEATS = 5
UNBOUNDED_S = 3600.0
SPAWN = multiprocessing.get_context("spawn")


FETCH = "curl -s https://example.com/doc | html2text"


def prose_words(count: int, nonce: str) -> str:
    words = fixtures.prose().split()
    text = (words * (count // len(words) + 1))[:count]
    return f"Document {nonce}.\n" + " ".join(text)


def conversation(text: str, nonce: str) -> list[dict[str, Any]]:
    tool_id = f"toolu_bench_{nonce}"
    return [
        {"role": "user", "content": "Summarise this document."},
        {
            "role": "assistant",
            # A fetched page, not a file read: hookd keeps file reads exact, so Kompress never sees them.
            "content": [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": FETCH}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": text}]},
    ]


def child(conn: Connection, mode: str, threads: int, model_cache: str, repeats: int) -> None:
    """One worker-like process: load, warm, report memory, time prose of each size."""
    from worker import offline

    offline.prepare(model_cache=model_cache)
    from worker import ml

    # No per-request ML budget here: the point is the cost of all the text, not the cut-off.
    facts = ml.load(ml.Options(mode, threads, budget=UNBOUNDED_S))
    from worker.engine import Engine, resident_mb

    engine = Engine(facts)
    engine.warm()
    result: dict[str, Any] = {"facts": facts, "rss_mb": resident_mb(), "sizes": {}}
    for words in SIZES_WORDS:
        timings, tokens, after = [], 0, 0
        for repeat in range(repeats):
            nonce = f"{mode}-{threads}-{words}-{repeat}-{time.monotonic_ns()}"
            messages = conversation(prose_words(words, nonce), nonce)
            started = time.perf_counter()
            reply = engine.compress(messages, "claude-sonnet-4-5-20250929", {})
            timings.append((time.perf_counter() - started) * 1000)
            tokens, after = reply["tokens_before"], reply["tokens_after"]
        result["sizes"][words] = {"median_ms": statistics.median(timings), "tokens": tokens, "tokens_after": after}
    result["rss_after_mb"] = resident_mb()
    conn.send(result)
    conn.close()


def measure(mode: str, threads: int, model_cache: Path, repeats: int) -> dict[str, Any]:
    ours, theirs = SPAWN.Pipe()
    process = SPAWN.Process(target=child, args=(theirs, mode, threads, str(model_cache), repeats))
    process.start()
    theirs.close()
    result: dict[str, Any] = ours.recv()
    process.join(60)
    return result


def model_cache_for(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    from worker import artifacts

    cache = args.model_cache or artifacts.default_cache()
    if not args.quick and artifacts.presence(cache, artifacts.required()).complete:
        return cache, "the real model"
    size = "tiny" if args.quick else "base"
    standin_model.seed_cache(work, standin_model.SIZES[size])
    return work, f"the {size} stand-in (random weights; see the module docstring)"


def report(runs: dict[str, dict[str, Any]], model: str, command: str, seconds: float) -> str:
    lines = [
        "# Kompress cost per worker",
        "",
        f"- command: `{command}`; took {seconds:.0f} s",
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        f"- model: {model}",
        "",
        "| worker | ML | ONNX threads | RSS after warm-up (MB) | RSS after the run (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, run in runs.items():
        threads = name.split("/")[1]
        lines.append(
            f"| {name} | {run['facts']['ml_text_compression']} | {threads} | {run['rss_mb']:.0f} | "
            f"{run['rss_after_mb']:.0f} |"
        )
    off = runs["off/1"]
    lines += [
        "",
        f"Model cost per worker: {runs['on/1']['rss_mb'] - off['rss_mb']:+.0f} MB resident.",
        "",
        "| words | tokens | off (ms) | on, 1 thread (ms) | on, all CPUs (ms) | ML ms per 1,000 tokens, 1 thread | "
        "all CPUs | tokens after (on) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for words in SIZES_WORDS:
        base, one, every = (runs[name]["sizes"][words] for name in ("off/1", "on/1", f"on/{os.cpu_count()}"))
        per_1k = [(run["median_ms"] - base["median_ms"]) / one["tokens"] * 1000 for run in (one, every)]
        lines.append(
            f"| {words} | {one['tokens']} | {base['median_ms']:.1f} | {one['median_ms']:.1f} | "
            f"{every['median_ms']:.1f} | {per_1k[0]:.0f} | {per_1k[1]:.0f} | {one['tokens_after']} |"
        )
    largest = runs["on/1"]["sizes"][SIZES_WORDS[-1]]
    per_token_ms = (largest["median_ms"] - off["sizes"][SIZES_WORDS[-1]]["median_ms"]) / largest["tokens"]
    if per_token_ms > 0:
        lines += [
            "",
            f"With hookd's default `--ml-budget 2`, a worker with one thread compresses about "
            f"{2000 / per_token_ms:,.0f} tokens of prose per request on this CPU; the rest goes as it is.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ml", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny stand-in model, one repetition")
    parser.add_argument("--model-cache", type=Path, help="HuggingFace hub cache holding the real model")
    parser.add_argument("--out", type=Path, help="directory for results.json and report.md")
    args = parser.parse_args(argv)
    out = args.out or Path("bench/results") / time.strftime("ml-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    repeats = 1 if args.quick else REPEATS
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as work:
        cache, model = model_cache_for(args, Path(work))
        runs = {
            f"{mode}/{threads}": measure(mode, threads, cache, repeats)
            for mode, threads in (("off", 1), ("on", 1), ("on", cpus))
        }
    command = "python -m bench.ml " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(runs, model, command.strip(), time.monotonic() - started)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"model": model, "runs": runs}, indent=1))
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
