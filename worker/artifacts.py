"""The Kompress files the installed headroom asks for, and whether a HuggingFace cache has them.

headroom pins the model and its tokenizer to commit SHAs (`headroom.onnx_runtime`); a cache holds
a revision under `models--<org>--<name>/snapshots/<sha>/`. The workers ask this module whether
the model is there before they try to load it, and `hookd models` uses it to fetch and report.
Nothing here imports onnxruntime or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What AutoTokenizer reads for ModernBERT's fast tokenizer: tokenizer.json carries the vocabulary,
# and transformers reads the model's config.json to pick the tokenizer class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


@dataclass(frozen=True)
class Repo:
    repo_id: str
    revision: str
    # For the model: the ONNX variants in the order headroom tries them (any one will do).
    # For the tokenizer: every file is needed.
    files: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    model: Repo
    tokenizer: Repo


@dataclass(frozen=True)
class Presence:
    model_file: str | None
    missing_tokenizer_files: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.model_file is not None and not self.missing_tokenizer_files


def required() -> Plan:
    # Private names of headroom's: the version range in pyproject.toml is the one these were read from.
    from headroom.onnx_runtime import _resolve_revision
    from headroom.transforms import kompress_compressor as kompress

    def pinned(repo_id: str) -> str:
        # HEADROOM_HF_PIN=off floats the revision; the cache then resolves "main" through its refs.
        return _resolve_revision(repo_id, None) or "main"

    model_id = kompress.HF_MODEL_ID
    tokenizer_id = kompress._MODERNBERT_TOKENIZER_REPO
    return Plan(
        model=Repo(model_id, pinned(model_id), tuple(kompress._onnx_filename_candidates())),
        tokenizer=Repo(tokenizer_id, pinned(tokenizer_id), TOKENIZER_FILES),
    )


def default_cache() -> Path:
    """Where huggingface_hub looks: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_dir(cache: Path, repo: Repo) -> Path:
    return cache / ("models--" + repo.repo_id.replace("/", "--")) / "snapshots" / repo.revision


def cached(cache: Path, repo: Repo, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo.repo_id, filename, cache_dir=str(cache), revision=repo.revision)
    return isinstance(found, str)


def presence(cache: Path, plan: Plan) -> Presence:
    model_file = next((name for name in plan.model.files if cached(cache, plan.model, name)), None)
    missing = tuple(name for name in plan.tokenizer.files if not cached(cache, plan.tokenizer, name))
    return Presence(model_file, missing)
