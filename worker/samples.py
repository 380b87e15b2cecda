"""Warm-up conversations: one tool result of each kind headroom routes differently.

Compressing these once before taking traffic loads the tokenizer vocab, the Rust core and each
compressor's lazy state, so the first real request does not pay for it (~0.9 s cold).
"""

from __future__ import annotations

import json
from typing import Any


def _json_rows() -> str:
    rows = [
        {"id": i, "name": f"package-{i % 37}", "version": f"1.{i % 9}.{i % 5}", "status": "ok" if i % 11 else "failed"}
        for i in range(300)
    ]
    return json.dumps(rows, indent=2)


def _log_lines() -> str:
    lines = []
    for i in range(400):
        level = "ERROR" if i % 97 == 0 else "INFO"
        lines.append(
            f"2026-01-01T10:{i // 60:02d}:{i % 60:02d}Z {level} worker[{i % 4}] handled request {i} in {i % 13} ms"
        )
    return "\n".join(lines)


def _search_hits() -> str:
    return "\n".join(
        f"src/module_{i % 23}.py:{i * 7 % 400 + 1}:    result = compute(value_{i}, retries={i % 3})" for i in range(300)
    )


def _diff() -> str:
    hunks = []
    for i in range(40):
        hunks.append(
            f"diff --git a/src/file_{i}.py b/src/file_{i}.py\n--- a/src/file_{i}.py\n+++ b/src/file_{i}.py\n"
            f"@@ -{i * 10 + 1},6 +{i * 10 + 1},6 @@\n def handler_{i}(request):\n"
            f"-    timeout = {i}\n+    timeout = {i + 1}\n     return serve(request, timeout)\n \n"
        )
    return "".join(hunks)


def _prose() -> str:
    sentence = (
        "The service keeps a pool of warm worker processes so that each conversation returns to "
        "the process that already holds its compressed history, which keeps every turn fast. "
    )
    # One Kompress chunk (350 words): enough to prove the model runs, quick on any CPU.
    return "".join(f"Paragraph {i}. {sentence * 3}\n\n" for i in range(3))


def conversations() -> dict[str, list[dict[str, Any]]]:
    """One short Anthropic-shaped conversation per content type, ending in its tool result."""
    out = {}
    for name, text in (
        ("json", _json_rows()),
        ("log", _log_lines()),
        ("search", _search_hits()),
        ("diff", _diff()),
        ("text", _prose()),
    ):
        tool_id = f"toolu_warmup_{name}"
        out[name] = [
            {"role": "user", "content": f"Show me the {name} output."},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tool_id, "name": "bash", "input": {"command": name}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": text}]},
            {"role": "assistant", "content": "Here is what it says."},
            {"role": "user", "content": "Thanks, go on."},
        ]
    return out
