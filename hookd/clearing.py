"""Clearing old tool output: the history policy's strongest level (`history: clear`).

Old tool results are replaced by a short note that names the tool, what it was called with and
how much it returned, and says how to get it back: call the tool again. This is what SWE-agent's
observation masking and Anthropic's `clear_tool_uses` context editing do; The Complexity Trap
(Lindenbauer et al., 2025) measured it halving agent cost at equal solve rates. Only a tool
result's content is ever replaced; tool calls and assistant text stay as they are.

Kept whatever their age: the last `keep` tool results; the latest read of every file not edited
since (the agent edits against it); the latest failing test or build output (it is working on
that failure); and tools whose output is the agent's state (todo lists, plans, the user's answers
to its questions). The note depends only on the original call and output, so it is the same on
every turn, from every worker and after every restart.

Tool names and shell commands are matched here with small tables rather than headroom's
detectors: this runs in the front end, which does not load headroom, and a wrong guess costs only
a kept output (or, for a read, a re-read).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

# Outputs that are the agent's own state or a person's answer: never cleared.
STATE_TOOLS = frozenset(
    {"todowrite", "todoread", "todo_write", "update_plan", "memory", "askuserquestion", "exitplanmode", "skill"}
)
READ_TOOLS = frozenset({"read", "read_file", "view", "notebookread", "open_file"})
EDIT_TOOLS = frozenset(
    {"edit", "multiedit", "write", "notebookedit", "str_replace_editor", "str_replace_based_edit_tool"}
    | {"apply_patch", "create_file", "write_file", "edit_file", "replace_in_file"}
)
PATH_ARGUMENTS = ("file_path", "path", "notebook_path", "filename")
READ_COMMAND = re.compile(r"^\s*(?:cd\s+\S+\s*&&\s*)?(?:cat|head|tail|nl|less|more|bat|sed\s+-n)\b")
EDITING_COMMAND = re.compile(
    r"\bsed\s+-i|(?<![<>&2])>>?\s*[^\s&|]|\btee\b|\bpatch\b|\bgit\s+(?:apply|checkout|restore)\b"
)
BUILD_COMMAND = re.compile(
    r"\b(?:pytest|tox|nox|unittest|jest|vitest|mocha|go\s+(?:test|build|vet)|cargo\s+(?:test|build|check|clippy)"
    r"|npm\s+(?:test|run)|yarn|pnpm|make|mvn|gradle|tsc|mix\s+(?:test|compile)|ruff|mypy|eslint|dotnet)\b"
)
FAILURE = re.compile(
    r"\bFAILED\b|\bFAIL\b|\bfailed\b|Traceback \(most recent call last\)|\berror(?:\[E\d+\])?:|\bError:"
    r"|panicked at|exit code: [1-9]|\bERRORS?\b"
)
# Shorter outputs are left alone: the note would save little.
MIN_CHARS = 600
MAX_INPUT_CHARS = 160


@dataclass(frozen=True)
class ToolOutput:
    message: int
    block: int | None  # index in an Anthropic user message's content; None for an OpenAI tool message
    call_id: str
    tool: str
    arguments: dict[str, Any]
    text: str
    error: bool = False

    @property
    def path(self) -> str | None:
        for name in PATH_ARGUMENTS:
            if isinstance(self.arguments.get(name), str):
                return str(self.arguments[name])
        return None

    @property
    def command(self) -> str:
        value = self.arguments.get("command") or self.arguments.get("cmd")
        return value if isinstance(value, str) else ""


def outputs(messages: list[Any]) -> list[ToolOutput]:
    """Every tool result of the conversation, in order, with the call that produced it."""
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    found: list[ToolOutput] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        calls.update(_calls(message))
        for block, call_id, content, error in _results(message):
            tool, arguments = calls.get(call_id, ("unknown tool", {}))
            found.append(ToolOutput(index, block, call_id, tool, arguments, _text(content), error))
    return found


def keep_list(found: list[ToolOutput], keep: int) -> set[str]:
    """The call ids whose output stays, whatever its age."""
    kept = {out.call_id for out in found[-keep:]} if keep else set()
    kept |= {out.call_id for out in found if out.tool.lower() in STATE_TOOLS}
    failing = [out for out in found if _failing(out)]
    if failing:
        kept.add(failing[-1].call_id)
    latest_read: dict[str, ToolOutput] = {}
    for out in found:
        path = _read_path(out)
        if path is not None:
            latest_read[path] = out
        elif _edits(out):
            for read_path in list(latest_read):
                if read_path == out.path or read_path in out.command:
                    del latest_read[read_path]
    return kept | {out.call_id for out in latest_read.values()}


def placeholder(out: ToolOutput) -> str:
    lines = out.text.count("\n") + 1
    shown = orjson.dumps(out.arguments, option=orjson.OPT_SORT_KEYS).decode()
    if len(shown) > MAX_INPUT_CHARS:
        shown = shown[: MAX_INPUT_CHARS - 3] + "..."
    return (
        f"[hookd cleared this old {out.tool} output to save tokens: {lines} lines, {len(out.text)} characters, "
        f"from {out.tool} {shown}. Call the tool again if you need it.]"
    )


def clear(
    forms: dict[int, Any], originals: list[Any], keep: int, upto: int, pinned: set[int] | None = None
) -> dict[int, Any]:
    """New forms for the messages before `upto` whose tool results fall out of the keep-list.
    `forms` maps an index to the form that would otherwise be sent (the original when absent);
    the note is built from the original output, so it never depends on how that was compressed.
    Messages in `pinned` (ones a dedup pointer refers to) keep their output."""
    found = outputs(originals)
    kept = keep_list(found, keep)
    cleared: dict[int, Any] = {}
    for out in found:
        if out.message >= upto or out.call_id in kept or out.message in (pinned or ()) or len(out.text) < MIN_CHARS:
            continue
        message = cleared.get(out.message) or forms.get(out.message) or originals[out.message]
        cleared[out.message] = _replace(message, out, placeholder(out))
    return cleared


def _replace(message: dict[str, Any], out: ToolOutput, note: str) -> dict[str, Any]:
    if out.block is None:
        return {**message, "content": note}
    content = list(message["content"])
    content[out.block] = {**content[out.block], "content": note}
    return {**message, "content": content}


def _calls(message: dict[str, Any]) -> Iterator[tuple[str, tuple[str, dict[str, Any]]]]:
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            arguments = block.get("input")
            yield str(block.get("id")), (str(block.get("name")), arguments if isinstance(arguments, dict) else {})
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        try:
            arguments = orjson.loads(call["function"].get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            arguments = {}
        name = str(call["function"].get("name"))
        yield str(call.get("id")), (name, arguments if isinstance(arguments, dict) else {})


def _results(message: dict[str, Any]) -> Iterator[tuple[int | None, str, Any, bool]]:
    if message.get("role") == "tool":
        yield None, str(message.get("tool_call_id")), message.get("content"), False
        return
    content = message.get("content")
    for index, block in enumerate(content if isinstance(content, list) else []):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            yield index, str(block.get("tool_use_id")), block.get("content"), block.get("is_error") is True


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    return ""


def _read_path(out: ToolOutput) -> str | None:
    if out.tool.lower() in READ_TOOLS:
        return out.path
    if READ_COMMAND.match(out.command) and not EDITING_COMMAND.search(out.command):
        words = out.command.split()
        return words[-1] if len(words) > 1 else None
    return None


def _edits(out: ToolOutput) -> bool:
    return out.tool.lower() in EDIT_TOOLS or bool(EDITING_COMMAND.search(out.command))


def _failing(out: ToolOutput) -> bool:
    return bool(BUILD_COMMAND.search(out.command)) and (out.error or bool(FAILURE.search(out.text)))
