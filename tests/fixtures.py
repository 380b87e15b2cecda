"""Realistic conversations built at test time from real command output on this machine.

The shared corpus is not part of a clone; these stand in for it where a test needs bulky,
real-looking tool output (pip's package list as JSON, git's log, grep hits, a long log).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def pip_list_json() -> str:
    return _run([sys.executable, "-m", "pip", "list", "--format", "json"])


def grep_hits() -> str:
    site = Path(subprocess.__file__).parent
    return _run(["grep", "-rn", "def ", str(site / "asyncio")])[:60000]


def git_log() -> str:
    text = _run(["git", "log", "--stat", "-n", "200"])
    if len(text) < 2000:
        # A fresh clone may hold a handful of commits; the standard library's own source is
        # real text of the same kind and always there.
        text = (Path(subprocess.__file__).read_text())[:40000]
    return text


def build_log() -> str:
    return (
        _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", str(REPO)])[:20000]
        + (_run([sys.executable, "-m", "pip", "show", "-f", "aiohttp"])[:40000])
    )


def prose() -> str:
    """Real English prose: the licence text CPython installs beside its standard library, or,
    where a distribution left it out, the standard library's own module documentation."""
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if licence.is_file():
        return licence.read_text()[:12000]
    return "\n\n".join(inspect.getdoc(module) or "" for module in (subprocess, inspect, sysconfig))[:12000]


def prose_call(session_id: str) -> dict[str, Any]:
    """An Anthropic-shaped call whose last tool result is prose, fetched by a shell command (a page,
    not a file read: hookd keeps file reads exact)."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What does the licence of this Python allow?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_prose",
                    "name": "Bash",
                    "input": {"command": "curl -s https://docs.python.org/3/license.html | html2text"},
                }
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_prose", "content": prose()}]},
    ]
    return hook_call(messages, "anthropic", session_id=session_id)


TOOL_OUTPUTS = {"pip_list": pip_list_json, "grep": grep_hits, "git_log": git_log, "pip_show": build_log}


def anthropic_session(marker: str = "") -> list[dict[str, Any]]:
    """An Anthropic-shaped agent conversation: one tool call per kind of output, then a question.
    `marker` is planted in the first tool result (privacy tests look for it afterwards)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Look around this machine and summarise it."}]
    for index, (name, produce) in enumerate(TOOL_OUTPUTS.items()):
        tool_id = f"toolu_{index:02d}_{name}"
        output = produce() or f"{name}: no output\n" * 50
        if index == 0 and marker:
            output = f"{marker}\n{output}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Running {name}."},
                    {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": name}},
                ],
            }
        )
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": output}]}
        )
    messages.append({"role": "assistant", "content": "I have looked at everything."})
    messages.append({"role": "user", "content": "What did you find?"})
    return messages


def openai_session() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful shell agent."},
        {"role": "user", "content": "Look around this machine and summarise it."},
    ]
    for index, (name, produce) in enumerate(TOOL_OUTPUTS.items()):
        call_id = f"call_{index:02d}_{name}"
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "bash", "arguments": f'{{"cmd": "{name}"}}'},
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": produce() or f"{name}\n" * 50})
    messages.append({"role": "user", "content": "What did you find?"})
    return messages


def hook_call(
    messages: list[dict[str, Any]], provider: str = "anthropic", session_id: str = "sess-test"
) -> dict[str, Any]:
    model = "claude-sonnet-4-5-20250929" if provider == "anthropic" else "gpt-4o"
    body: dict[str, Any] = {"model": model, "max_tokens": 4096, "stream": True, "messages": messages}
    if provider == "anthropic":
        body["system"] = [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}]
        body["tools"] = [{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object"}}]
    return {
        "metadata": {"provider": provider, "model": model, "session_id": session_id, "request_id": "req-1"},
        "request_body": body,
    }


def big_json_conversation(nonce: str) -> list[dict[str, Any]]:
    """~1.4 MB of distinct JSON tool output: about a second of work for a worker, so it is
    visibly busy when a test's fault hits. The nonce makes every conversation new to hookd."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"list every file ({nonce})"}]
    for i in range(8):
        tool_id = f"toolu_big_{i}"
        rows = [{"id": f"{nonce}-{i}-{k}", "path": f"/src/a{k % 50}.py", "size": k * 13 % 997} for k in range(3000)]
        messages.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Ls", "input": {}}]}
        )
        result = {"type": "tool_result", "tool_use_id": tool_id, "content": orjson.dumps(rows).decode()}
        messages.append({"role": "user", "content": [result]})
    messages += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "summarise"}]
    return messages
