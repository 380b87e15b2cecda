"""headroom inside a worker: the marker-free pipeline, token counting, limits, one compress call.

Import this module only after `offline.prepare()`: it imports headroom, which reads its
environment on import.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import time
from typing import Any

import headroom
import orjson
from headroom.config import DEFAULT_BYTE_EXACT_EXCLUDE_TOOLS
from headroom.models.registry import ModelRegistry
from headroom.tokenizers import get_tokenizer
from headroom.tokenizers.huggingface import HuggingFaceTokenizer
from headroom.transforms import TransformPipeline, content_router
from headroom.transforms.content_router import ContentRouter

from worker import samples
from worker.dedup import Dedup

# `headroom.compress` is rebound to the function by headroom/__init__; the module that holds the
# pipeline singleton is only reachable through importlib.
_compress_module = importlib.import_module("headroom.compress")

# Counting model for names whose tokenizer would come from the HuggingFace hub (deepseek, qwen,
# llama...): offline, headroom fails the whole call for them. o200k_base is what headroom uses for
# every Claude and recent GPT model and ships with litellm.
OFFLINE_COUNTING_MODEL = "gpt-4o"
# Context windows headroom's registry does not know, by name prefix.
MODEL_LIMIT_OVERRIDES = (
    ("deepseek-", 131072),
    ("qwen", 131072),
    ("llama", 131072),
    ("kimi", 131072),
)
DEFAULT_MODEL_LIMIT = 200000
# What a retrieval instruction looks like in headroom's output. The hook never sees the response,
# so nothing could answer one; a message that still carries one is sent in its original form.
RETRIEVAL_MARKERS = (b"Retrieve more: hash=", b"Retrieve original: hash=", b"<<ccr:")
STALE_POINTER_TEXT = b"Retrieve original: hash="
# headroom's stale-Read pass replaces a file read that a later edit made stale with a note, and
# ignores the marker settings: it always ends the note with a retrieval pointer. The note itself
# is true and useful ("re-read the file"), so only the pointer is cut. This pass saves ~40% on
# Claude Code sessions that edit what they read.
STALE_READ_POINTER = re.compile(r"(\[Read content (?:stale|superseded): [^\]]*?) Retrieve original: hash=[0-9a-f]+\]")


def marker_free_pipeline(kompress: bool = False, strong: bool = False) -> TransformPipeline:
    """headroom's default pipeline with retrieval markers and the CCR store off, and Kompress
    only when `worker.ml` has already loaded it; `compress()` offers no knob for these, so the
    pipeline is built here.

    `strong` is the pipeline the history policy compresses whole histories with (modes auto and
    clear): cross-turn dedup on (a later output's span that repeats an earlier output verbatim
    becomes a pointer to it; it only ever refers back, so what was sent before never changes), and
    a file read superseded by a later read of the same file replaced (the later one has the
    content). A read made stale by a
    later edit is kept: the agent's next edits to that file copy their `old_string` from it, and
    losing it means a failed edit or a re-read (measured by bench.cache's quality check). The
    history policy's `clear` mode clears such reads itself, with a note saying how to get them
    back."""
    pipeline = TransformPipeline()
    for index, transform in enumerate(pipeline.transforms):
        if isinstance(transform, ContentRouter):
            config = dataclasses.replace(
                transform.config,
                ccr_inject_marker=False,
                ccr_enabled=False,
                # Off unless loaded: headroom would otherwise load it on a background thread and
                # pass text through (remembered as "skip") until it is ready.
                enable_kompress=kompress,
                enable_cross_turn_dedup=strong,
            )
            if strong:
                config.read_lifecycle = dataclasses.replace(
                    config.read_lifecycle, compress_stale=False, compress_superseded=True
                )
            # observer=None: headroom's default observer stages usage beacons for the network.
            pipeline.transforms[index] = ContentRouter(config, observer=None)
            return pipeline
    raise RuntimeError("headroom's default pipeline has no ContentRouter to configure")


def keep_file_reads_whole() -> None:
    """File reads (Claude Code's Read, Cursor's read_file) stay byte for byte as read, whatever
    repeats them: an edit's `old_string` is copied from one read, often across several lines, and
    a cross-turn dedup pointer in the middle of it leaves the lines only in pieces, elsewhere.
    headroom reads this set at call time, for the tools whose output it never rewrites."""
    content_router.DEFAULT_VERBATIM_EXCLUDE_TOOLS = frozenset(
        content_router.DEFAULT_VERBATIM_EXCLUDE_TOOLS | DEFAULT_BYTE_EXACT_EXCLUDE_TOOLS
    )


def use_pipeline(pipeline: TransformPipeline) -> None:
    """Make `pipeline` the one `headroom.compress()` runs (a module singleton in headroom)."""
    with _compress_module._pipeline_lock:
        _compress_module._pipeline = pipeline
    if os.environ.get("HEADROOM_DETECT_BACKEND") == "python":
        # Chosen on purpose (see worker.offline); headroom would warn, per worker, that the native
        # detector is unsafe on Windows, which says nothing true about this choice.
        content_router._detect_backend_warned = True


def counting_model(model: str) -> str:
    if not model or isinstance(get_tokenizer(model), HuggingFaceTokenizer):
        return OFFLINE_COUNTING_MODEL
    return model


def model_limit(model: str) -> int:
    info = ModelRegistry.resolve(model) if model else None
    if info is not None and info.context_window:
        return int(info.context_window)
    lowered = model.lower()
    for prefix, limit in MODEL_LIMIT_OVERRIDES:
        if lowered.startswith(prefix):
            return limit
    return DEFAULT_MODEL_LIMIT


def marker_text(message: Any) -> bytes:
    # Serialised once and searched as bytes: far cheaper than walking or repr() of a 1 MB message.
    return orjson.dumps(message)


def cut_pointers(value: Any) -> Any:
    """`value` with the retrieval pointer cut from every stale-Read note in it."""
    if isinstance(value, str):
        return STALE_READ_POINTER.sub(r"\1]", value) if "Retrieve original: hash=" in value else value
    if isinstance(value, list):
        return [cut_pointers(item) for item in value]
    if isinstance(value, dict):
        return {key: cut_pointers(item) for key, item in value.items()}
    return value


def resident_mb() -> float:
    """This process's resident memory, for the front end's recycle-on-growth rule."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _kompressed(result: Any) -> bool:
    # The router names text it sent through Kompress "router:text:<ratio>" (OpenAI tool messages)
    # or "router:tool_result:text" (Anthropic tool_result blocks); without Kompress, text is left
    # alone and named neither way.
    applied = any(
        name.startswith("router:text:") or name == "router:tool_result:text" for name in result.transforms_applied
    )
    return applied and result.tokens_after < result.tokens_before


def has_marker(text: bytes) -> bool:
    return any(marker in text for marker in RETRIEVAL_MARKERS)


class Engine:
    def __init__(self, ml_facts: dict[str, Any] | None = None) -> None:
        """`ml_facts` come from `worker.ml.load`, which must run before headroom is first used."""
        self.ml_facts = ml_facts or {"ml_text_compression": False, "ml_reason": "not loaded"}
        self.kompress = bool(self.ml_facts["ml_text_compression"])
        keep_file_reads_whole()
        self.pipelines = {False: marker_free_pipeline(self.kompress)}
        self.dedup = Dedup()
        use_pipeline(self.pipelines[False])
        self.current = False
        self.version = headroom.__version__
        self._counting: dict[str, str] = {}
        self._limits: dict[str, int] = {}

    def facts(self) -> dict[str, Any]:
        """What this worker can do, for GET /config (and to check savings_profile against)."""
        from headroom.agent_savings import _PROFILES

        return {"headroom_version": self.version, "savings_profiles": sorted(_PROFILES), **self.ml_facts}

    def warm(self) -> float:
        """Compress one sample of each kind; with Kompress loaded, the prose sample must come
        back compressed by it, or the worker is not ready (never half-on)."""
        started = time.perf_counter()
        for kind, conversation in samples.conversations().items():
            result = headroom.compress(conversation, model=OFFLINE_COUNTING_MODEL, protect_recent=0)
            if result.tokens_before <= 0:
                raise RuntimeError("warm-up compression failed; see headroom's log above")
            if kind == "text" and self.kompress and not _kompressed(result):
                raise RuntimeError(f"Kompress is loaded but left the warm-up text alone: {result.transforms_applied}")
        return (time.perf_counter() - started) * 1000

    def compress(
        self,
        messages: list[Any],
        model: str,
        knobs: dict[str, Any],
        frozen: int = 0,
        strong: bool = False,
        offset: int = 0,
        session: str = "",
        count: bool = False,
    ) -> dict[str, Any]:
        """Compress `messages`, leaving the first `frozen` exactly as they are. Token counts
        cover only the messages after the frozen ones: the front end knows the rest. `strong`
        picks the history policy's pipeline; `offset` is where `messages` start in the
        conversation; with a `session`, the new messages' output is deduplicated against
        everything this worker has seen of that conversation (worker.dedup). With `count`, the
        reply says how many tokens each changed message had and has (the history policy bills
        rewrites by them)."""
        started = time.perf_counter()
        counting = self._cached(self._counting, model, counting_model)
        limit = self._cached(self._limits, model, model_limit)
        self._select(strong)
        result = headroom.compress(messages, model=counting, model_limit=limit, frozen_message_count=frozen, **knobs)
        reply: dict[str, Any] = {"ok": True, "tokens_before": result.tokens_before, "tokens_after": result.tokens_after}
        if len(result.messages) != len(messages):
            # Sent whole, so the front end's validation sees (and refuses) the new length.
            reply["messages"] = result.messages
            removed = 0
        else:
            compressed = result.messages
            if session:
                folded = self.dedup.fold(session, compressed, frozen, offset)
                compressed = [folded.get(i, m) for i, m in enumerate(compressed)]
            reply["changed"], removed = self._changes(messages, compressed)
            if frozen or removed or session:
                # headroom counts frozen messages inconsistently, and not the markers we removed.
                reply["tokens_before"], reply["tokens_after"] = self._recount(
                    counting, messages, reply["changed"], frozen
                )
            if count:
                reply["counts"] = self._counts(counting, messages, reply["changed"])
        return reply | {
            "model_limit": limit,
            "markers_removed": removed,
            "worker_ms": (time.perf_counter() - started) * 1000,
            "rss_mb": resident_mb(),
        }

    def _select(self, strong: bool) -> None:
        if strong not in self.pipelines:
            self.pipelines[strong] = marker_free_pipeline(self.kompress, strong=True)
        if self.current != strong:
            use_pipeline(self.pipelines[strong])
            self.current = strong

    @staticmethod
    def _cached(cache: dict[str, Any], model: str, compute: Any) -> Any:
        if model not in cache:
            if len(cache) > 1024:
                cache.clear()
            cache[model] = compute(model)
        return cache[model]

    @staticmethod
    def _changes(original: list[Any], compressed: list[Any]) -> tuple[list[list[Any]], int]:
        """Only the messages headroom changed go back over the socket; a changed one that still
        carries a retrieval marker is dropped, so its original goes upstream."""
        changed = []
        removed = 0
        for index, (before, after) in enumerate(zip(original, compressed, strict=True)):
            if after is before or after == before:
                continue
            text = marker_text(after)
            if STALE_POINTER_TEXT in text:
                after = cut_pointers(after)
                text = marker_text(after)
            if has_marker(text) and not has_marker(marker_text(before)):
                removed += 1
                continue
            changed.append([index, after])
        return changed, removed

    @staticmethod
    def _counts(model: str, original: list[Any], changed: list[list[Any]]) -> list[list[int]]:
        tokenizer = _compress_module._get_pipeline()._get_tokenizer(model)
        return [
            [index, int(tokenizer.count_messages([original[index]])), int(tokenizer.count_messages([message]))]
            for index, message in changed
        ]

    @staticmethod
    def _recount(model: str, original: list[Any], changed: list[list[Any]], frozen: int) -> tuple[int, int]:
        sent = list(original)
        for index, message in changed:
            sent[index] = message
        tokenizer = _compress_module._get_pipeline()._get_tokenizer(model)
        return int(tokenizer.count_messages(original[frozen:])), int(tokenizer.count_messages(sent[frozen:]))
