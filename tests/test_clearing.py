"""Clearing old tool output (`history: clear`): what is kept, what the note says, and that it is the
same note every time."""

from __future__ import annotations

import copy
from typing import Any

from hookd import clearing

BIG = "line of output\n" * 100


def call(tool_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": name, "input": arguments}]}


def result(tool_id: str, text: str = BIG, error: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id, "content": text}
    if error:
        block["is_error"] = True
    return {"role": "user", "content": [block]}


def conversation(*steps: tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], str]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "fix the bug"}]
    for index, step in enumerate(steps):
        name, arguments = step[0], step[1]
        text = step[2] if len(step) > 2 else BIG
        messages += [call(f"t{index}", name, arguments), result(f"t{index}", text)]
    return messages


def cleared(messages: list[dict[str, Any]], keep: int = 1) -> dict[int, Any]:
    return clearing.clear({}, messages, keep=keep, upto=len(messages))


def test_old_output_is_cleared_and_the_last_ones_kept() -> None:
    messages = conversation(*[("Bash", {"command": f"ls dir{i}"}) for i in range(5)])
    out = cleared(messages, keep=2)
    assert sorted(out) == [2, 4, 6]
    note = out[2]["content"][0]["content"]
    assert note.startswith("[hookd cleared this old Bash output")
    assert '{"command":"ls dir0"}' in note and f"{len(BIG)} characters" in note and "101 lines" in note
    assert "Call the tool again" in note
    # Only the result's content changes: its id, and the tool call, stay as they were.
    assert out[2]["content"][0]["tool_use_id"] == "t0"
    assert 1 not in out and messages[1]["content"][0]["input"] == {"command": "ls dir0"}


def test_the_latest_read_of_a_file_not_edited_since_survives() -> None:
    messages = conversation(
        ("Read", {"file_path": "/src/a.py"}),
        ("Read", {"file_path": "/src/b.py"}),
        ("Edit", {"file_path": "/src/b.py", "old_string": "x", "new_string": "y"}),
        *[("Bash", {"command": f"pytest -k t{i}"}, "ok\n" * 400) for i in range(3)],
    )
    out = cleared(messages)
    assert 2 not in out, "a.py was never edited: its read stays"
    assert 4 in out, "b.py was edited after its read: the read may go"


def test_a_shell_read_counts_as_a_read_and_a_shell_write_as_an_edit() -> None:
    messages = conversation(
        ("Bash", {"command": "cat src/a.py"}),
        ("Bash", {"command": "cat src/b.py"}),
        ("Bash", {"command": "sed -i s/x/y/ src/b.py"}, "ok"),
        *[("Bash", {"command": f"ls {i}"}) for i in range(2)],
    )
    out = cleared(messages)
    assert 2 not in out and 4 in out


def test_the_latest_failing_test_output_survives() -> None:
    failing = "FAILED tests/test_a.py::test_one - AssertionError\n" * 30
    messages = conversation(
        ("Bash", {"command": "pytest -x"}, failing),
        ("Bash", {"command": "pytest -x"}, failing),
        *[("Bash", {"command": f"grep -rn thing {i}"}) for i in range(3)],
    )
    out = cleared(messages)
    assert 2 in out and 4 not in out


def test_state_and_answers_are_never_cleared() -> None:
    messages = conversation(
        ("TodoWrite", {"todos": ["a"]}),
        ("AskUserQuestion", {"question": "which?"}),
        *[("Bash", {"command": f"ls {i}"}) for i in range(3)],
    )
    out = cleared(messages)
    assert 2 not in out and 4 not in out


def test_pinned_messages_and_small_outputs_stay() -> None:
    messages = conversation(("Bash", {"command": "ls"}), ("Bash", {"command": "pwd"}, "/home"), ("Bash", {"x": 1}))
    out = clearing.clear({}, messages, keep=1, upto=len(messages), pinned={2})
    assert out == {}


def test_the_note_is_the_same_whatever_was_sent_before() -> None:
    messages = conversation(*[("Bash", {"command": f"ls dir{i}"}) for i in range(4)])
    first = cleared(copy.deepcopy(messages))
    compressed = {2: result("t0", "a compressed form of the output")}
    again = clearing.clear(compressed, messages, keep=1, upto=len(messages))
    assert first[2] == again[2]


def test_openai_tool_messages_are_cleared_too() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "agent"}, {"role": "user", "content": "go"}]
    for i in range(3):
        arguments = f'{{"command": "python run{i}.py"}}'
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "bash", "arguments": arguments}}
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": BIG})
    out = cleared(messages)
    assert sorted(out) == [3, 5]
    assert out[3]["content"].startswith("[hookd cleared this old bash output")
    assert out[3]["tool_call_id"] == "c0"
