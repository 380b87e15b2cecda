"""The worker's environment, fixed before headroom is imported.

headroom and its dependencies read these variables at import time or on first use, so setting
them later is too late. Each one closes a way request content could leave the process (disk,
network) or a way the first request could stall on a download that can never succeed here.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import MutableMapping
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


def prepare(env: MutableMapping[str, str] | None = None) -> None:
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
