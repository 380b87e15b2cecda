"""The hook contract: which HookCallData we act on, and a `modify` answer that changes only messages."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest

from hookd import protocol
from hookd.protocol import Passthrough

MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "list files"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a\nb\n" * 50}]},
]

CALL: dict[str, Any] = {
    "metadata": {
        "login_name": "alice@example.com",
        "model": "claude-sonnet-4-20250514",
        "provider": "anthropic",
        "request_id": "req_abc123",
        "session_id": "sess_xyz789",
    },
    "request_body": {
        "model": "claude-sonnet-4-body",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": MESSAGES,
        "tools": [{"name": "Bash", "input_schema": {"type": "object", "properties": {}}}],
        "temperature": 0.25,
        "stream": True,
        "metadata": {"user_id": "u1"},
    },
}


def call_with(metadata: Any = None, **body_changes: Any) -> bytes:
    """CALL as JSON, with metadata replaced (when given) and request_body fields overridden."""
    call = copy.deepcopy(CALL)
    if metadata is not None:
        call["metadata"] = metadata
    call["request_body"].update(body_changes)
    return json.dumps(call).encode()


# --- parse ------------------------------------------------------------------------------------------


def test_parse_reads_the_fields_we_act_on() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    assert call.messages == MESSAGES
    assert call.body == CALL["request_body"]
    assert call.model == "claude-sonnet-4-20250514"
    assert call.provider == "anthropic"
    assert call.session_id == "sess_xyz789"


def test_parse_accepts_a_bytearray() -> None:
    assert protocol.parse(bytearray(json.dumps(CALL).encode())).session_id == "sess_xyz789"


def test_model_falls_back_to_the_request_body() -> None:
    call = protocol.parse(call_with(metadata={"provider": "anthropic", "session_id": "s"}))
    assert call.model == "claude-sonnet-4-body"


def test_empty_metadata_model_falls_back_to_the_request_body() -> None:
    assert protocol.parse(call_with(metadata={"model": ""})).model == "claude-sonnet-4-body"


def test_missing_metadata_leaves_provider_and_session_empty() -> None:
    raw = json.dumps({"request_body": {"model": "gpt-4o", "messages": []}}).encode()
    call = protocol.parse(raw)
    assert (call.model, call.provider, call.session_id) == ("gpt-4o", "", "")


@pytest.mark.parametrize("metadata", [[], "meta", 42, True])
def test_non_object_metadata_is_treated_as_absent(metadata: Any) -> None:
    call = protocol.parse(call_with(metadata=metadata))
    assert (call.model, call.provider, call.session_id) == ("claude-sonnet-4-body", "", "")


@pytest.mark.parametrize("value", [None, 42, 1.5, True, ["a"], {"id": "a"}])
def test_non_string_metadata_values_become_empty(value: Any) -> None:
    raw = call_with(metadata={"model": value, "provider": value, "session_id": value}, model=value)
    call = protocol.parse(raw)
    assert (call.model, call.provider, call.session_id) == ("", "", "")


def test_empty_messages_array_is_still_parsed() -> None:
    assert protocol.parse(call_with(messages=[])).messages == []


# --- passthrough ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{not json", id="invalid-json"),
        pytest.param(b'{"request_body": {"messages": []}', id="truncated"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[]", id="top-level-array"),
        pytest.param(b'"a string"', id="top-level-string"),
        pytest.param(b"null", id="top-level-null"),
        pytest.param(b"42", id="top-level-number"),
        pytest.param(b'{"metadata": {}}', id="no-request-body"),
        pytest.param(b'{"request_body": null}', id="null-request-body"),
        pytest.param(b'{"request_body": [1, 2]}', id="array-request-body"),
        pytest.param(b'{"request_body": "{}"}', id="string-request-body"),
        pytest.param(b'{"request_body": {"model": "m"}}', id="no-messages"),
        pytest.param(b'{"request_body": {"contents": [{"parts": []}]}}', id="gemini-contents"),
        pytest.param(b'{"request_body": {"input": "hi"}}', id="responses-input"),
        pytest.param(b'{"request_body": {"messages": {"0": "a"}}}', id="object-messages"),
        pytest.param(b'{"request_body": {"messages": "hello"}}', id="string-messages"),
        pytest.param(b'{"request_body": {"messages": null}}', id="null-messages"),
        pytest.param(b'{"request_body": {"messages": [], "temperature": NaN}}', id="nan"),
        pytest.param(b'{"request_body": {"messages": [], "temperature": Infinity}}', id="infinity"),
        pytest.param(b'{"request_body": {"messages": [], "temperature": 1e400}}', id="float-overflow"),
        pytest.param(b'{"request_body": {"messages": [' + b"[" * 1030 + b"]" * 1030 + b"]}}", id="deeper-than-1024"),
    ],
)
def test_bodies_we_do_not_compress_pass_through(raw: bytes) -> None:
    with pytest.raises(Passthrough):
        protocol.parse(raw)


@pytest.mark.parametrize(
    "number",
    [
        pytest.param(b"18446744073709551616", id="2**64"),
        pytest.param(b"-9223372036854775809", id="-2**63-1"),
        pytest.param(b"123456789012345678901234567890", id="30-digits"),
    ],
)
def test_integers_past_64_bits_pass_through(number: bytes) -> None:
    # orjson would read these as floats and modify() would write back a different number.
    with pytest.raises(Passthrough):
        protocol.parse(b'{"request_body": {"messages": [], "seed": ' + number + b"}}")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b'"1234567890123456789012345"', id="digits-in-a-string"),
        pytest.param(b"0.1234567890123456789012", id="long-float"),
        pytest.param(b"9223372036854775807", id="int64-max"),
    ],
)
def test_long_digit_runs_that_survive_a_rewrite_are_still_parsed(value: bytes) -> None:
    call = protocol.parse(b'{"request_body": {"messages": [], "id": ' + value + b"}}")
    assert call.body["id"] == json.loads(value)


def test_deep_body_is_checked_for_wide_integers() -> None:
    in_string = b"[" * 150 + b'"id 1234567890123456789012"' + b"]" * 150
    call = protocol.parse(b'{"request_body": {"messages": [], "t": ' + in_string + b"}}")
    assert call.messages == []
    wide = b"[" * 150 + b"1234567890123456789012" + b"]" * 150
    with pytest.raises(Passthrough):
        protocol.parse(b'{"request_body": {"messages": [], "t": ' + wide + b"}}")


def test_body_nested_deeper_than_can_be_written_back_passes_through() -> None:
    deep = b"[" * 1020 + b"1" + b"]" * 1020
    with pytest.raises(Passthrough, match="nested"):
        protocol.parse(b'{"request_body": {"messages": [], "t": ' + deep + b"}}")


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"properties": value}
    return value


def test_a_body_too_deep_to_write_back_passes_through() -> None:
    # orjson reads nesting up to 1024 levels but writes only about 255.
    raw = json.dumps({"request_body": {"messages": MESSAGES, "tools": [nested(300)]}}).encode()
    with pytest.raises(Passthrough):
        protocol.parse(raw)


def test_body_nested_well_within_limits_is_written_back() -> None:
    raw = json.dumps({"request_body": {"messages": MESSAGES, "tools": [nested(100)]}}).encode()
    call = protocol.parse(raw)
    assert json.loads(protocol.modify(call.body, call.messages))["request_body"]["tools"] == [nested(100)]


# --- modify -----------------------------------------------------------------------------------------


def test_modify_answers_modify_with_the_new_messages() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    new_messages = [{**m, "content": "short"} for m in MESSAGES]
    answer = json.loads(protocol.modify(call.body, new_messages))
    assert answer["action"] == "modify"
    assert answer["request_body"]["messages"] == new_messages


def test_modify_keeps_every_other_field_and_its_order() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    answer = json.loads(protocol.modify(call.body, [{"role": "user", "content": "x"}]))
    body = answer["request_body"]
    assert list(body) == list(CALL["request_body"])  # messages stays where it was
    for key, value in CALL["request_body"].items():
        if key != "messages":
            assert body[key] == value
            assert json.dumps(body[key]) == json.dumps(value)  # nested key order too


def test_modify_has_only_action_and_request_body() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    answer = orjson.loads(protocol.modify(call.body, call.messages))
    assert list(answer) == ["action", "request_body"]


def test_modify_with_unchanged_messages_reproduces_the_body() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    assert json.loads(protocol.modify(call.body, call.messages))["request_body"] == CALL["request_body"]


def test_modify_does_not_mutate_the_parsed_body() -> None:
    call = protocol.parse(json.dumps(CALL).encode())
    protocol.modify(call.body, [])
    assert call.body["messages"] == MESSAGES


def test_modify_output_is_strict_json() -> None:
    call = protocol.parse(call_with(system='caf\u00e9 \u2603 \U0001f600 "quoted" \\ \n'))
    raw = protocol.modify(call.body, call.messages)
    assert isinstance(raw, bytes)
    raw.decode("utf-8")
    answer = json.loads(raw, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert answer["request_body"]["system"] == 'caf\u00e9 \u2603 \U0001f600 "quoted" \\ \n'


def test_allow_answer_is_the_contract_allow() -> None:
    assert json.loads(protocol.ALLOW) == {"action": "allow"}
