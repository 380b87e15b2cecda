"""The last check before `modify`: compressed messages must still be the same conversation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from hookd.validate import InvalidOutput, check

Messages = list[Any]

ANTHROPIC: Messages = [
    {"role": "user", "content": [{"type": "text", "text": "why does the build fail?"}]},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me run it."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "make"}},
            {"type": "tool_use", "id": "toolu_02", "name": "Read", "input": {"path": "Makefile"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "error: missing dep\n" * 200},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_02",
                "content": [{"type": "text", "text": "all: build\n" * 100}],
                "cache_control": {"type": "ephemeral"},
            },
        ],
    },
    {"role": "assistant", "content": "The dependency is missing."},
]

OPENAI: Messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "what is in the log?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "read_log", "arguments": "{}"}},
            {"id": "call_def", "type": "function", "function": {"name": "grep", "arguments": '{"q": "x"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "INFO started\n" * 300},
    {"role": "tool", "tool_call_id": "call_def", "content": "x matched\n" * 50},
    {"role": "assistant", "content": "The log shows a normal start."},
]


def changed(messages: Messages, edit: Callable[[Messages], object]) -> Messages:
    """A deep copy of messages with `edit` applied, as a worker would hand it back."""
    copied = copy.deepcopy(messages)
    edit(copied)
    return copied


def shorten(messages: Messages) -> Messages:
    """What compression looks like: every string content and tool result gets shorter."""

    def short(content: Any) -> Any:
        if isinstance(content, str):
            return content[:20]
        if isinstance(content, list):
            return [short_block(block) for block in content]
        return content

    def short_block(block: dict[str, Any]) -> dict[str, Any]:
        block = dict(block)
        for field in ("text", "content"):
            if field in block:
                block[field] = short(block[field])
        return block

    return [{**message, "content": short(message.get("content"))} for message in copy.deepcopy(messages)]


# --- faithful output passes -------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_the_same_list_passes(messages: Messages) -> None:
    check(messages, messages)


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_an_equal_copy_passes(messages: Messages) -> None:
    check(messages, copy.deepcopy(messages))


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_compressed_content_passes(messages: Messages) -> None:
    compressed = shorten(messages)
    assert compressed != messages
    check(messages, compressed)


def test_string_content_turned_into_text_blocks_passes() -> None:
    compressed = changed(ANTHROPIC, lambda m: m[3].update(content=[{"type": "text", "text": "Missing dep."}]))
    check(ANTHROPIC, compressed)


def test_cache_control_markers_may_change() -> None:
    compressed = changed(ANTHROPIC, lambda m: m[2]["content"][1].pop("cache_control"))
    check(ANTHROPIC, compressed)


def test_empty_conversation_passes() -> None:
    check([], [])


# --- anything else is invalid -----------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [None, {"messages": []}, "[]", ()], ids=repr)
def test_output_that_is_not_a_list_is_invalid(compressed: Any) -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, compressed)


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_a_dropped_message_is_invalid(messages: Messages) -> None:
    with pytest.raises(InvalidOutput, match="messages became"):
        check(messages, messages[:-1])


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_an_added_message_is_invalid(messages: Messages) -> None:
    with pytest.raises(InvalidOutput):
        check(messages, [*messages, {"role": "user", "content": "extra"}])


def test_an_empty_output_for_a_conversation_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, [])


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_a_changed_role_is_invalid(messages: Messages) -> None:
    with pytest.raises(InvalidOutput, match="role"):
        check(messages, changed(messages, lambda m: m[1].update(role="system")))


def test_a_dropped_role_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, changed(OPENAI, lambda m: m[1].pop("role")))


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
def test_reordered_messages_are_invalid(messages: Messages) -> None:
    with pytest.raises(InvalidOutput):
        check(messages, [messages[1], messages[0], *messages[2:]])


def test_reordered_tool_results_with_the_same_role_are_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, [*OPENAI[:3], OPENAI[4], OPENAI[3], OPENAI[5]])


def test_reordered_tool_result_blocks_are_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[2]["content"].reverse()))


def test_a_renamed_tool_use_id_is_invalid() -> None:
    with pytest.raises(InvalidOutput, match="tool call id"):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[1]["content"][1].update(id="toolu_99")))


def test_a_dropped_tool_use_id_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[1]["content"][1].pop("id")))


def test_a_dropped_tool_use_block_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[1]["content"].pop(2)))


def test_a_dropped_tool_result_block_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[2]["content"].pop(0)))


def test_a_dropped_tool_use_id_on_a_result_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[2]["content"][0].pop("tool_use_id")))


def test_a_changed_tool_use_id_on_a_result_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[2]["content"][0].update(tool_use_id="toolu_02")))


def test_a_tool_result_collapsed_to_a_string_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(ANTHROPIC, changed(ANTHROPIC, lambda m: m[2].update(content="both results, summarised")))


def test_a_changed_openai_tool_calls_id_is_invalid() -> None:
    with pytest.raises(InvalidOutput, match="tool call id"):
        check(OPENAI, changed(OPENAI, lambda m: m[2]["tool_calls"][0].update(id="call_xyz")))


def test_dropped_openai_tool_calls_are_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, changed(OPENAI, lambda m: m[2].pop("tool_calls")))


def test_a_dropped_openai_tool_call_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, changed(OPENAI, lambda m: m[2]["tool_calls"].pop()))


def test_a_changed_tool_call_id_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, changed(OPENAI, lambda m: m[3].update(tool_call_id="call_def")))


def test_a_dropped_tool_call_id_is_invalid() -> None:
    with pytest.raises(InvalidOutput):
        check(OPENAI, changed(OPENAI, lambda m: m[4].pop("tool_call_id")))


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
@pytest.mark.parametrize("replacement", ["a string", None, 42, ["role", "user"]], ids=repr)
def test_a_message_that_is_no_longer_an_object_is_invalid(messages: Messages, replacement: Any) -> None:
    with pytest.raises(InvalidOutput, match="not an object"):
        check(messages, [replacement, *messages[1:]])


@pytest.mark.parametrize("messages", [ANTHROPIC, OPENAI], ids=["anthropic", "openai"])
@pytest.mark.parametrize("content", [42, 3.5, True, {"type": "text", "text": "x"}, ["plain string block"]], ids=repr)
def test_content_of_an_unknown_shape_is_invalid(messages: Messages, content: Any) -> None:
    with pytest.raises(InvalidOutput, match="content"):
        check(messages, changed(messages, lambda m: m[-1].update(content=content)))
