"""The last check before `modify`: the compressed messages must still be the same conversation.

A provider rejects a request whose tool calls and results no longer pair up, and a different
number or order of turns changes what the model is asked. Anything we cannot prove intact is
answered `allow`, so a worker bug costs the tokens we would have saved, never the request.
"""

from __future__ import annotations

from typing import Any


class InvalidOutput(Exception):
    """The worker's messages are not a faithful compression of the originals."""


def check(original: list[Any], compressed: Any) -> None:
    if not isinstance(compressed, list):
        raise InvalidOutput("messages is not a list")
    if len(compressed) != len(original):
        raise InvalidOutput(f"{len(original)} messages became {len(compressed)}")
    for index, (before, after) in enumerate(zip(original, compressed, strict=True)):
        if before is after:
            continue
        if not isinstance(after, dict) or not isinstance(before, dict):
            raise InvalidOutput(f"message {index} is not an object")
        if after.get("role") != before.get("role"):
            raise InvalidOutput(f"message {index} changed role")
        if not _content_shape_ok(after.get("content")):
            raise InvalidOutput(f"message {index} has content of an unknown shape")
        if tool_links(after) != tool_links(before):
            raise InvalidOutput(f"message {index} lost or changed a tool call id")


def _content_shape_ok(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(block, dict) for block in content)


def tool_links(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every id that ties a tool call to its result, in order, in both provider shapes."""
    links: list[tuple[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") in ("tool_use", "server_tool_use"):
                links.append(("tool_use", block.get("id")))
            elif "tool_use_id" in block:
                links.append(("tool_result", block.get("tool_use_id")))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        links.extend(("tool_call", call.get("id") if isinstance(call, dict) else call) for call in tool_calls)
    if "tool_call_id" in message:
        links.append(("tool_call_id", message.get("tool_call_id")))
    return links
