"""ML text compression (Kompress): loaded before traffic, never half-on, offline, CPU or CUDA.

The real model cannot be downloaded here, so a small stand-in with the same inputs, outputs and
tokenizer interface (tests/standin_model.py) is seeded into a private HuggingFace cache at the
revisions the installed headroom pins; hookd's workers then load it with headroom's own code.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hookd import models
from hookd.affinity import session_key, slot_for
from hookd.settings import Settings, default_pool_size
from tests import client, corpus, fixtures, standin_model
from tests.hookd_process import Hookd
from worker import artifacts, ml, offline

pytestmark = pytest.mark.skipif(ml.missing_modules() != [], reason=f"hookd[ml] not installed: {ml.missing_modules()}")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin_model.seed_cache(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def ml_hookd(model_cache: Path, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookd]:
    state = tmp_path_factory.mktemp("state")
    with Hookd("--model-cache", str(model_cache), state_dir=state, env={"HOME": str(home)}) as server:
        yield server


def text_of(answer: dict[str, Any]) -> str:
    return str(answer["request_body"]["messages"][-1]["content"][0]["content"])


async def post(server: Hookd, call: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        status, _, answer = await client.post(session, server.url, call)
    assert status == 200
    return dict(answer)


# -- provider choice and thread sizing -------------------------------------------------------


def test_cuda_goes_first_when_onnxruntime_offers_it() -> None:
    assert ml.choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [ml.CUDA, ml.CPU]
    assert ml.choose_providers(["CPUExecutionProvider"]) == [ml.CPU]


def test_session_is_built_with_cuda_first_when_cuda_is_reported(model_cache: Path) -> None:
    """A child process loads the stand-in with onnxruntime claiming CUDA: the session is asked
    for CUDA then CPU, and with no device here it runs on the CPU and says so."""
    script = textwrap.dedent(
        f"""
        import json, os
        from worker import offline
        offline.prepare(model_cache={str(model_cache)!r})
        import onnxruntime
        asked = []
        real = onnxruntime.InferenceSession
        def recording(path, options=None, providers=None, **kw):
            asked.append(list(providers))
            return real(path, options, providers=["CPUExecutionProvider"], **kw)
        onnxruntime.InferenceSession = recording
        onnxruntime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        from worker import ml
        facts = ml.load(ml.Options(mode="on", threads=1))
        print(json.dumps({{"asked": asked, "facts": facts}}))
        """
    )
    result = json.loads(run_python(script).splitlines()[-1])
    assert result["asked"] == [[ml.CUDA, ml.CPU]]
    assert result["facts"]["ml_text_compression"] is True
    assert result["facts"]["ml_provider"] == ml.CPU
    assert "no CUDA device" in result["facts"]["ml_reason"]


def test_without_cuda_the_session_is_cpu_only(model_cache: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json
        from worker import offline
        offline.prepare(model_cache={str(model_cache)!r})
        from worker import ml
        from headroom.transforms import kompress_compressor as kompress
        facts = ml.load(ml.Options(mode="on", threads=1))
        session = kompress._kompress_cache[kompress.HF_MODEL_ID][0]._session
        print(json.dumps({{"facts": facts, "providers": session.get_providers()}}))
        """
    )
    result = json.loads(run_python(script).splitlines()[-1])
    assert result["providers"] == [ml.CPU]
    assert "ml_reason" not in result["facts"]


def test_a_broken_model_turns_text_compression_off_in_auto_and_fails_in_on(tmp_path: Path) -> None:
    cache = standin_model.seed_cache(tmp_path)
    plan = artifacts.required()
    (artifacts.snapshot_dir(cache, plan.model) / plan.model.files[0]).write_bytes(b"not an onnx model")
    script = textwrap.dedent(
        f"""
        import json
        from worker import offline
        offline.prepare(model_cache={str(cache)!r})
        from worker import ml
        auto = ml.load(ml.Options(mode="auto"))
        try:
            ml.load(ml.Options(mode="on"))
            on = "loaded"
        except Exception as exc:
            on = type(exc).__name__
        print(json.dumps({{"auto": auto, "on": on}}))
        """
    )
    result = json.loads(run_python(script).splitlines()[-1])
    assert result["auto"]["ml_text_compression"] is False
    assert "failed to load" in result["auto"]["ml_reason"]
    assert result["on"] != "loaded"


def test_threads_share_the_cpus_among_workers() -> None:
    cores = default_pool_size()
    assert Settings(pool_size=cores).onnx_threads == 1
    assert Settings(pool_size=1).onnx_threads == cores
    assert Settings(pool_size=cores * 4).onnx_threads == 1
    assert Settings(pool_size=2, ml_threads=3).onnx_threads == 3
    assert Settings(pool_size=2, ml_threads=3).worker_options()["ml"]["threads"] == 3


def test_onnxruntime_gpu_alone_is_pointed_out_to_headroom_native_detection() -> None:
    versions = {"onnxruntime-gpu": "1.24.1"}
    library = offline.gpu_only_ort_library(versions.get)
    assert library is not None and "libonnxruntime.so" in library and Path(library).is_file()
    assert offline.gpu_only_ort_library({"onnxruntime": "1.24.1"}.get) is None
    assert offline.gpu_only_ort_library({}.get) is None


# -- hookd models ------------------------------------------------------------------------------


def test_models_check_reports_the_stand_in_present(model_cache: Path) -> None:
    out = run_hookd("models", "check", "--cache", str(model_cache))
    assert out.returncode == 0, out.stdout + out.stderr
    plan = artifacts.required()
    assert f"{plan.model.repo_id} @ {plan.model.revision}: present" in out.stdout
    assert f"{plan.tokenizer.repo_id} @ {plan.tokenizer.revision}: present" in out.stdout
    assert "text compression: will be active" in out.stdout


def test_models_check_finds_the_model_under_hf_home(tmp_path: Path) -> None:
    """Without --cache, the cache is huggingface_hub's own: $HF_HOME/hub here."""
    standin_model.seed_cache(tmp_path / "hub")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HOOKD_MODEL_CACHE")}
    out = run_hookd("models", "check", env={**env, "HF_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"cache: {tmp_path / 'hub'}" in out.stdout


def test_models_check_says_what_is_missing(tmp_path: Path) -> None:
    out = run_hookd("models", "check", "--cache", str(tmp_path))
    assert out.returncode == 1
    assert "missing (any of onnx/kompress-int8-wo.onnx" in out.stdout
    assert "missing tokenizer.json" in out.stdout
    assert "will be off: model not in" in out.stdout and "hookd models pull" in out.stdout


def test_models_pull_asks_for_exactly_the_pinned_revisions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    asked: list[tuple[str, str, str, list[str]]] = []

    def fake_download(repo_id: str, revision: str, cache_dir: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, revision, cache_dir, allow_patterns))
        return cache_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # pull lifts it; monkeypatch puts it back
    assert models.main(["pull", "--cache", str(tmp_path)]) == 1  # nothing really arrived
    plan = artifacts.required()
    assert asked == [
        (plan.model.repo_id, plan.model.revision, str(tmp_path), [plan.model.files[0]]),
        (plan.tokenizer.repo_id, plan.tokenizer.revision, str(tmp_path), list(plan.tokenizer.files)),
    ]
    assert len(plan.model.revision) == 40 and len(plan.tokenizer.revision) == 40


# -- the real server -----------------------------------------------------------------------------


def test_every_worker_reports_text_compression_active(ml_hookd: Hookd) -> None:
    status, config = ml_hookd.get("/config")
    assert status == 200
    assert config["ml_text_compression"] is True
    assert config["ml_provider"] == ml.CPU
    workers = config["workers"]
    assert len(workers) == 2 and all(w["ml_text_compression"] and w["ml_threads"] >= 1 for w in workers)
    assert any("text compression on (Kompress" in line for line in ml_hookd.stderr)


async def test_prose_is_compressed_on_the_first_request_and_the_same_way_again(ml_hookd: Hookd) -> None:
    original = fixtures.prose()
    calls = calls_on_both_workers()
    first = await post(ml_hookd, calls[0])
    assert first["action"] == "modify"
    assert len(text_of(first)) < 0.9 * len(original)
    # A new conversation with the same text, on the other worker: the same output.
    again = await post(ml_hookd, calls[1])
    assert text_of(again) == text_of(first)


async def test_nothing_is_written_to_home(ml_hookd: Hookd, home: Path) -> None:
    """ONNX Runtime would keep a device id and usage events under ~/.cache/Microsoft."""
    await post(ml_hookd, fixtures.prose_call("prose-home"))
    assert [str(p) for p in home.rglob("*")] == []


async def test_without_the_model_text_compression_is_off_and_says_why(tmp_path: Path) -> None:
    with Hookd("--model-cache", str(tmp_path / "empty"), state_dir=tmp_path, pool_size=1) as server:
        config = server.get("/config")[1]
        assert config["ml_text_compression"] is False
        assert "model not in" in config["ml_reason"]
        assert any("text compression off: model not in" in line for line in server.stderr)
        answer = await post(server, fixtures.prose_call("prose-off"))
        assert answer["action"] == "allow"


async def test_ml_on_without_the_model_keeps_workers_out_of_service(tmp_path: Path) -> None:
    server = Hookd("--ml", "on", "--model-cache", str(tmp_path / "empty"), state_dir=tmp_path, pool_size=1)
    try:
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            server.wait_ready(timeout=15)
        assert server.get("/readyz")[0] == 503
        assert any("--ml on, but text compression is off" in line for line in server.stderr)
        answer = await post(server, fixtures.prose_call("prose-on"))
        assert answer["action"] == "allow"
    finally:
        server.stop()


@pytest.mark.corpus
@pytest.mark.skipif(not corpus.available(), reason=corpus.why_missing())
async def test_corpus_prose_is_compressed_on_its_first_request(ml_hookd: Hookd) -> None:
    """cc-spotter-258c7280-s0's second request carries the session's first tool output, prose:
    it comes back compressed, with no request passed through while a model loads."""
    session = corpus.sessions({"cc-spotter-258c7280-s0"})[0]
    calls = corpus.hook_calls(session)
    await post(ml_hookd, calls[0])
    answer = await post(ml_hookd, calls[1])
    assert answer["action"] == "modify"
    sent = calls[1]["request_body"]["messages"]
    got = answer["request_body"]["messages"]
    assert len(json.dumps(got[-1])) < len(json.dumps(sent[-1]))


def calls_on_both_workers() -> list[dict[str, Any]]:
    """Two prose calls whose sessions hash to different workers of a pool of two."""
    by_slot: dict[int, dict[str, Any]] = {}
    for number in range(100):
        call = fixtures.prose_call(f"prose-{number}")
        key = session_key(call["metadata"]["session_id"], call["request_body"]["messages"])
        by_slot.setdefault(slot_for(key, 2), call)
    return [by_slot[0], by_slot[1]]


def run_python(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=corpus.REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_hookd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hookd", *args], capture_output=True, text=True, timeout=120, cwd=corpus.REPO, env=env
    )


@pytest.mark.slow
def test_bench_ml_quick_reports_memory_and_latency(tmp_path: Path) -> None:
    from bench import ml as bench_ml

    assert bench_ml.main(["--quick", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs["off/1"]["facts"]["ml_text_compression"] is False
    assert runs["on/1"]["facts"]["ml_text_compression"] is True
    for run in runs.values():
        assert run["rss_mb"] > 50
        for size in run["sizes"].values():
            assert size["median_ms"] > 0 and size["tokens"] > 0
    # With the model, prose comes back shorter; without it, unchanged.
    assert all(s["tokens_after"] < s["tokens"] for s in runs["on/1"]["sizes"].values())
    assert all(s["tokens_after"] == s["tokens"] for s in runs["off/1"]["sizes"].values())
    report = (tmp_path / "report.md").read_text()
    assert "Model cost per worker" in report and "ML ms per 1,000 tokens" in report
