"""`python -m bench --quick` end to end: it writes the JSON, the report and valid plots, with numbers for
every contender and the headline ratios. Skipped, saying why, when the corpus is absent."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import corpus, deployment

pytestmark = [pytest.mark.corpus, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
CONTENDERS = {"inprocess", "hookd", "hookd_noaff", "hookd_plain", "hookd_plain_noaff", "proxy", "naive"} | (
    {"hookd_replicas"} if deployment.missing() is None else set()
)
PLOTS = {"latency_vs_size.png", "throughput_vs_concurrency.png", "latency_per_turn.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not corpus.available():
        pytest.skip(corpus.why_missing())
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "bench", "--quick", "--out", str(out)]
    # Bounded, but well above what the quick mode takes on two quiet cores (2-4 minutes with the
    # two-replica contender): this guards against a hang, not a slow machine.
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def results(out: Path) -> dict[str, Any]:
    return dict(orjson.loads((out / "results.json").read_bytes()))


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_every_contender_has_its_figures(results: dict[str, Any]) -> None:
    figures = results["summary"]["contenders"]
    assert set(figures) == CONTENDERS
    for key, f in figures.items():
        saturation = f["interleaved"]["saturation"]
        numbers = {
            "replay p50": f["replay"]["warm"]["p50"],
            "replay p99": f["replay"]["warm"]["p99"],
            "throughput": saturation["throughput_rps"],
            "p99 at saturation": saturation["latency"]["p99"],
            "cpu per request": saturation["cpu_ms_per_request"],
            "peak rss": f["peak_rss_mb"],
            "start-up": f["startup_s"],
            "tokens before": f["replay"]["tokens_before"],
        }
        assert all(positive(v) for v in numbers.values()), (key, numbers)
        assert f["replay"]["errors"] == 0, key


def test_headline_ratios_are_there_for_both_modes(results: dict[str, Any]) -> None:
    for name in ("floor_ratio", "affinity_ratio", "throughput_ratio", "p99_ratio"):
        assert set(results["summary"]["headline"][name]) == {"sticky", "plain"}
        assert all(positive(v) for v in results["summary"]["headline"][name].values()), name


def test_hookd_saves_tokens_without_retrieval_markers(results: dict[str, Any]) -> None:
    for key in ("hookd", "hookd_plain"):
        replay = results["summary"]["contenders"][key]["replay"]
        assert replay["tokens_saved"] > 0
        assert replay["answers_with_markers"] == 0


def test_report_states_machine_versions_ratios_and_command(out: Path, results: dict[str, Any]) -> None:
    report = (out / "report.md").read_text()
    assert f"{results['machine']['cpu_count']} cores" in report
    assert f"headroom-ai {results['versions']['headroom-ai']}" in report
    assert "## Closing note" in report
    assert "python -m bench --quick" in report
    assert f"{results['summary']['headline']['floor_ratio']['sticky']:.2f}" in report


def test_plots_are_png_images(out: Path, results: dict[str, Any]) -> None:
    assert set(results["plots"]) == PLOTS
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
        assert width > 100 and height > 100, name
        assert f"]({name})" in (out / "report.md").read_text()
