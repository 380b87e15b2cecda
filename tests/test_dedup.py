"""Cross-turn dedup kept between turns (worker/dedup.py): new output that repeats earlier output
points at the earlier message by its number in the whole conversation, file reads stay whole, and
an index that no longer matches the history is started again."""

from __future__ import annotations

from typing import Any

from worker import offline

offline.prepare()

from worker.dedup import Dedup  # noqa: E402 - headroom reads its environment on import

LISTING = "\n".join(f"src/module_{i}.py: def handler_{i}(request, response):" for i in range(40))


def turn(index: int, tool: str, output: str) -> list[dict[str, Any]]:
    tool_id = f"t{index}"
    return [
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": tool, "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": output}]},
    ]


def conversation(*outputs: tuple[str, str]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for index, (tool, output) in enumerate(outputs):
        messages += turn(index, tool, output)
    return messages


def output_of(message: dict[str, Any]) -> str:
    return message["content"][0]["content"]


def replay(dedup: Dedup, messages: list[dict[str, Any]], window: int = 2) -> list[dict[str, Any]]:
    """Send the conversation two messages a turn, each job carrying `window` messages of context."""
    sent: list[dict[str, Any]] = [messages[0]]
    for end in range(3, len(messages) + 1, 2):
        start = max(0, len(sent) - window)
        job = sent[start:] + messages[len(sent) : end]
        changed = dedup.fold("conversation", job, len(sent) - start, start)
        sent += [changed.get(p, m) for p, m in enumerate(job) if p >= len(sent) - start]
    return sent


def test_output_repeating_an_old_one_points_at_it_by_its_number() -> None:
    messages = conversation(("Bash", LISTING), ("Bash", "ok"), ("Bash", "ok too"), ("Bash", "header\n" + LISTING))
    sent = replay(Dedup(), messages)
    folded = output_of(sent[8])
    assert folded.startswith("header\n[↑40L same as msg 2: ")
    assert len(folded) < len(LISTING) / 10
    # Nothing sent before changes.
    assert sent[:8] == messages[:8]


def test_file_reads_are_never_folded_but_can_be_pointed_at() -> None:
    messages = conversation(("Read", LISTING), ("Read", LISTING), ("Bash", LISTING))
    sent = replay(Dedup(), messages)
    assert output_of(sent[4]) == LISTING
    assert output_of(sent[6]).startswith("[↑40L same as msg 2: ")


def test_an_index_that_does_not_match_the_history_starts_again() -> None:
    dedup = Dedup()
    replay(dedup, conversation(("Bash", LISTING), ("Bash", "ok")))
    # The same conversation with its history rewritten: the old index must not be trusted.
    rewritten = conversation(("Bash", "cleared"), ("Bash", "ok"), ("Bash", LISTING))
    job = rewritten[1:]
    changed = dedup.fold("conversation", job, 4, 1)
    assert changed == {}, "the repeat's original is no longer in the history sent"


def test_indexes_are_bounded() -> None:
    dedup = Dedup(max_chars=len(LISTING) * 3)
    for name in range(10):
        job = conversation(("Bash", LISTING + f"\n{name}"))
        dedup.fold(f"conversation-{name}", job, 0, 0)
    assert dedup.chars <= len(LISTING) * 3 + 100
    assert len(dedup.indexes) < 10
