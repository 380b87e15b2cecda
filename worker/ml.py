"""Kompress, headroom's ML text compressor, in a worker: whether it can run, and loading it first.

Left to itself headroom loads the model lazily on a background thread; text that arrives meanwhile
is passed through and remembered as "skip" for 75 minutes, and two threads importing numpy at once
can leave Kompress off for the life of the process. So a worker does it all in its main thread
before it reports ready: import numpy, onnxruntime and transformers, build the ONNX Runtime
session (with CUDA first when onnxruntime-gpu sees a device; headroom only ever builds a CPU
session), load the tokenizer, and put both where headroom looks for a loaded model. Nothing is
downloaded here: the model comes from the local cache (`hookd models pull`) or not at all.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import artifacts

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
REQUIRED_MODULES = ("numpy", "onnxruntime", "transformers", "huggingface_hub")
ML_BUDGET_ENV = "HEADROOM_ML_STAGE_DEADLINE_SECONDS"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class MLUnavailable(RuntimeError):
    """`--ml on`, and text compression cannot run in this worker."""


@dataclass(frozen=True)
class Options:
    # auto: on when the packages and the model are there; on: a worker without them fails to
    # start; off: never.
    mode: str = "auto"
    # ONNX Runtime intra-op threads for this worker's session.
    threads: int = 1
    # Longest time one request may spend in Kompress; text left when it runs out is sent as it
    # is (and stays so on later turns, which keeps the prompt cache).
    budget: float = 2.0


def choose_providers(available: Sequence[str]) -> list[str]:
    """CUDA first when this onnxruntime build has it; ONNX Runtime falls back to the CPU
    provider by itself when no device answers."""
    return [CUDA, CPU] if CUDA in available else [CPU]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # finds it without importing it


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if not installed(name)]


def why_not(options: Options, cache: Path | None = None) -> str | None:
    """Why text compression will be off with these options, or None when it can be loaded.
    `cache`: the hub cache to look in (default: the one huggingface_hub will use)."""
    if options.mode == "off":
        return "turned off (--ml off)"
    missing = missing_modules()
    if missing:
        return f"not installed ({', '.join(missing)} missing): pip install 'hookd[ml]', or 'hookd[gpu]' on CUDA hosts"
    cache = cache or artifacts.default_cache()
    if not artifacts.presence(cache, artifacts.required()).complete:
        return f"model not in {cache} at the revisions headroom pins (fetch it with `hookd models pull`)"
    return None


def load(options: Options) -> dict[str, Any]:
    """Load Kompress when this worker should have it. Returns the facts GET /config shows;
    raises MLUnavailable when the mode is `on` and it cannot be loaded."""
    reason = why_not(options)
    if reason is None:
        try:
            return _load(options.threads, options.budget)
        except Exception as exc:
            if options.mode == "on":
                raise
            reason = f"the cached model failed to load ({type(exc).__name__}: {exc})"
            log.warning("text compression off: %s", reason)
    if options.mode == "on":
        raise MLUnavailable(f"--ml on, but text compression is off: {reason}")
    return {"ml_text_compression": False, "ml_reason": reason}


def _load(threads: int, budget: float) -> dict[str, Any]:
    started = time.perf_counter()
    import numpy  # noqa: F401  (imported here, in the main thread, before headroom's threads can race on it)
    import onnxruntime
    import transformers
    from headroom.transforms import kompress_compressor as kompress

    os.environ[kompress.KOMPRESS_ONNX_INTRA_THREADS_ENV] = str(threads)
    os.environ[kompress.KOMPRESS_ONNX_INTER_THREADS_ENV] = "1"
    # headroom allows 15 s of ML per request by default, three times Aperture's default hook
    # timeout: the answer would come after Aperture had given up on it.
    os.environ[ML_BUDGET_ENV] = str(budget)
    providers = choose_providers(onnxruntime.get_available_providers())
    # headroom's own artifact resolution, session options and smoke run, with our providers.
    session = kompress._create_onnx_session(kompress.HF_MODEL_ID, providers, allow_download=False)
    tokenizer = kompress._load_modernbert_tokenizer(transformers.AutoTokenizer, allow_download=False)
    with kompress._kompress_lock:
        kompress._kompress_cache[kompress.HF_MODEL_ID] = (kompress._OnnxModel(session), tokenizer, "onnx")
    provider = session.get_providers()[0]
    facts: dict[str, Any] = {
        "ml_text_compression": True,
        "ml_provider": provider,
        "ml_threads": threads,
        "ml_budget_s": budget,
        "ml_load_ms": round((time.perf_counter() - started) * 1000),
    }
    if CUDA in providers and provider != CUDA:
        facts["ml_reason"] = "onnxruntime-gpu is installed but no CUDA device is visible: running on the CPU"
    return facts
