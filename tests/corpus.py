"""The shared corpus of recorded agent sessions, when it is there.

A clone of hookd alone has no `../shared`; tests that need the corpus skip, saying so, and the
rest of the suite builds its own fixtures (see `fixtures.py`). HOOKD_CORPUS_DIR points elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO.parent / "shared" / "corpus"


def corpus_dir() -> Path:
    return Path(os.environ.get("HOOKD_CORPUS_DIR", DEFAULT_DIR))


def available() -> bool:
    return (corpus_dir() / "load.py").is_file()


def why_missing() -> str:
    return f"corpus not found at {corpus_dir()} (set HOOKD_CORPUS_DIR to a copy of shared/corpus)"


def loader() -> ModuleType:
    """The corpus's own loader module (stdlib + zstandard)."""
    spec = importlib.util.spec_from_file_location("corpus_load", corpus_dir() / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sessions(names: set[str] | None = None) -> list[dict[str, Any]]:
    return loader().load_sessions(str(corpus_dir() / "sessions"), names=names)


def hook_calls(session: dict[str, Any]) -> list[dict[str, Any]]:
    return list(loader().hook_calls(session))
