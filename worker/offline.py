"""The worker's environment, fixed before headroom is imported.

headroom and its dependencies read these variables at import time or on first use, so setting
them later is too late. Each one closes a way request content could leave the process (disk,
network) or a way the first request could stall on a download that can never succeed here.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from collections.abc import Callable, MutableMapping
from importlib import metadata
from pathlib import Path

# Variables that would send content elsewhere (a remote Kompress endpoint, a CCR backend, a
# telemetry sink). An operator's shell may carry them for headroom's own proxy; a hook must not
# inherit them.
ROUTES_ELSEWHERE = (
    "HEADROOM_KOMPRESS_ENDPOINT",
    "HEADROOM_CCR_BACKEND",
    "HEADROOM_COMPRESS_SESSION_STORE",
    "HEADROOM_TELEMETRY_ENDPOINT",
    "HEADROOM_BEACON",
    "HEADROOM_TELEMETRY",
)


def litellm_tiktoken_dir() -> Path:
    """litellm, a dependency of headroom, ships the tiktoken vocab files (o200k_base and
    cl100k_base) under these cache names, so tiktoken never needs its download host."""
    return Path(sysconfig.get_paths()["purelib"]) / "litellm" / "litellm_core_utils" / "tokenizers"


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def gpu_only_ort_library(version_of: Callable[[str], str | None] = installed_version) -> str | None:
    """The ONNX Runtime library of an onnxruntime-gpu install, when that is the only ONNX Runtime.

    headroom's Rust content detection (chosen with HEADROOM_DETECT_BACKEND=rust) finds ONNX
    Runtime by asking for the `onnxruntime` distribution's version (>= 1.24); onnxruntime-gpu
    installs the same `onnxruntime` module under another distribution name, so without
    ORT_DYLIB_PATH native detection would quietly fall back to Python.
    """
    if version_of("onnxruntime") is not None or version_of("onnxruntime-gpu") is None:
        return None
    spec = importlib.util.find_spec("onnxruntime")  # finds the package without loading it
    if spec is None or not spec.origin:
        return None
    libraries = sorted((Path(spec.origin).parent / "capi").glob("libonnxruntime.so*"))
    return str(libraries[0]) if libraries else None


def prepare(env: MutableMapping[str, str] | None = None, model_cache: str | None = None) -> None:
    """`model_cache`: the HuggingFace hub cache holding the Kompress model (`--model-cache`)."""
    env = os.environ if env is None else env
    # No CCR store on disk: headroom would otherwise keep the original of every lossy block in
    # ~/.headroom/ccr_store.db, i.e. request content at rest.
    env["HEADROOM_STATELESS"] = "1"
    for name in ROUTES_ELSEWHERE:
        env.pop(name, None)
    # Offline unless the operator says otherwise (HOOKD_ALLOW_NETWORK=1, e.g. to let headroom
    # fetch a model on first use): HEADROOM_OFFLINE alone still let huggingface_hub do a lookup.
    if env.get("HOOKD_ALLOW_NETWORK", "").lower() not in ("1", "true", "yes"):
        env.setdefault("HEADROOM_OFFLINE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TIKTOKEN_CACHE_DIR", str(litellm_tiktoken_dir()))
    # transformers warns at import that PyTorch is missing; Kompress runs on ONNX Runtime and
    # only uses its tokenizer, so the warning would only mislead an operator reading the log.
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # ONNX Runtime >= 1.29 (used by Kompress and by headroom's native content detection) keeps a
    # device id and a database of usage events under ~/.cache/Microsoft/DeveloperTools and tries
    # to upload them. Set before ONNX Runtime initialises, this turns all of it off.
    env["ORT_DISABLE_TELEMETRY"] = "1"
    if model_cache:
        env["HF_HUB_CACHE"] = model_cache
    # With ONNX Runtime installed (the ml extra) headroom switches content detection to its native
    # Magika model. On the corpus's final requests that took 8.5 s against 4.1 s for the
    # pure-Python detector, for the same savings (0.862 vs 0.861 of the tokens), and slowed the
    # load test's workers enough to double the overloads. Python detection is what a base install
    # runs; HEADROOM_DETECT_BACKEND=rust in the environment picks the native one.
    env.setdefault("HEADROOM_DETECT_BACKEND", "python")
    # A file read through a shell (cat, sed -n, head) is never lossy-compressed: the agent edits
    # against its exact bytes, and a lossy read makes it read again. Claude Code's own Read tool
    # is protected by name already; this is the same protection for shell-based agents.
    env.setdefault("HEADROOM_PROTECT_READS", "1")
    if "ORT_DYLIB_PATH" not in env and (library := gpu_only_ort_library()):
        env["ORT_DYLIB_PATH"] = library
