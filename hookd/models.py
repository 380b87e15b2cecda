"""`hookd models pull` and `hookd models check`: the Kompress model on disk, for air-gapped hosts.

Workers never download: they load the model from a HuggingFace hub cache or run without it. `pull`
fills a cache, on a host that can reach the hub, with exactly the revisions the installed headroom
pins; the directory can then be copied to hosts that cannot and named with `--model-cache`.
`check` never touches the network and says what is there and whether text compression will run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from worker import artifacts, ml, offline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookd models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="download the pinned Kompress model and tokenizer (needs the hub)")
    check = commands.add_parser("check", help="report what is in the cache, without the network")
    for command in (pull, check):
        command.add_argument(
            "--cache",
            type=Path,
            default=os.environ.get("HOOKD_MODEL_CACHE"),
            metavar="DIR",
            help="HuggingFace hub cache directory (default: $HOOKD_MODEL_CACHE, else huggingface_hub's: "
            "$HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)",
        )
    pull.add_argument(
        "--all-variants",
        action="store_true",
        help="also fetch the ONNX variants headroom falls back to when the first will not load "
        "on a CPU (fp32, ~600 MB more)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        # Set before huggingface_hub is imported, which reads it once.
        os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        # Pulling is the one thing that is meant to reach the hub.
        os.environ.pop("HF_HUB_OFFLINE", None)
    if not ml.installed("huggingface_hub"):
        print("hookd models: huggingface_hub is not installed: pip install 'hookd[ml]'", file=sys.stderr)
        return 2
    cache = args.cache or artifacts.default_cache()
    if args.command == "pull":
        return pull(cache, args.all_variants)
    return check(cache)


def pull(cache: Path, all_variants: bool) -> int:
    from huggingface_hub import snapshot_download

    plan = artifacts.required()
    model_files = plan.model.files if all_variants else plan.model.files[:1]
    for repo, files in ((plan.model, model_files), (plan.tokenizer, plan.tokenizer.files)):
        print(f"fetching {repo.repo_id} @ {repo.revision}: {', '.join(files)}", flush=True)
        snapshot_download(repo.repo_id, revision=repo.revision, cache_dir=str(cache), allow_patterns=list(files))
    print(f"done: {cache}")
    return check(cache)


def check(cache: Path) -> int:
    plan = artifacts.required()
    found = artifacts.presence(cache, plan)
    print(f"cache: {cache}")
    model = f"present ({found.model_file})" if found.model_file else f"missing (any of {', '.join(plan.model.files)})"
    print(f"model      {plan.model.repo_id} @ {plan.model.revision}: {model}")
    tokenizer = f"missing {', '.join(found.missing_tokenizer_files)}" if found.missing_tokenizer_files else "present"
    print(f"tokenizer  {plan.tokenizer.repo_id} @ {plan.tokenizer.revision}: {tokenizer}")
    for name in ml.REQUIRED_MODULES:
        print(f"package    {name}: {_describe(name)}")
    reason = ml.why_not(ml.Options(), cache)
    if reason is None:
        print("text compression: will be active (with --ml auto or on, and this directory as --model-cache)")
        return 0
    print(f"text compression: will be off: {reason}")
    return 1


def _describe(module: str) -> str:
    if not ml.installed(module):
        return "missing"
    # onnxruntime may come from either distribution; say which.
    names = ("onnxruntime", "onnxruntime-gpu") if module == "onnxruntime" else (module.replace("_", "-"),)
    for name in names:
        if (version := offline.installed_version(name)) is not None:
            return f"{name} {version}"
    return "installed"
