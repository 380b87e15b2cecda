"""The history policy with real workers and real headroom, on a conversation made of real command
output (a file read twice, listings, logs), replayed on a clock the test moves: a cold turn
rewrites history once and the turns after it send the rewritten history byte for byte; `clear`
mode's notes are the same after a worker is killed and replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.inprocess import Clock, Served, served
from hookd import sticky
from tests import fixtures

pytestmark = pytest.mark.slow
SOURCE = Path(fixtures.REPO / "hookd" / "history.py")


def numbered(text: str) -> str:
    """A file as Claude Code's Read tool shows it."""
    return "".join(f"{n:6d}→{line}\n" for n, line in enumerate(text.splitlines(), 1))


def steps() -> list[tuple[str, dict[str, Any], str]]:
    source = numbered(SOURCE.read_text())
    return [
        ("Read", {"file_path": str(SOURCE)}, source),
        ("Bash", {"command": "pip list --format json"}, fixtures.pip_list_json()),
        ("Bash", {"command": "grep -rn 'def ' asyncio"}, fixtures.grep_hits()),
        ("Bash", {"command": "git log --stat"}, fixtures.git_log()),
        ("Read", {"file_path": str(SOURCE)}, source),
        ("Bash", {"command": "pip show -f aiohttp"}, fixtures.build_log()),
        ("Bash", {"command": "ls -la"}, "\n".join(sorted(os.listdir(fixtures.REPO)))),
        ("Bash", {"command": "pip list --format json"}, fixtures.pip_list_json()),
    ]


def conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Find out how the history policy decides."}]
    for index, (tool, arguments, output) in enumerate(steps()[:turns]):
        tool_id = f"toolu_{index:02d}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Step {index}."},
                    {"type": "tool_use", "id": tool_id, "name": tool, "input": arguments},
                ],
            }
        )
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": output}]}
        )
    for message in messages[-2:]:
        message["content"] = [{**block, "cache_control": {"type": "ephemeral"}} for block in message["content"]]
    return messages


def call(turns: int) -> dict[str, Any]:
    return fixtures.hook_call(conversation(turns), "anthropic", session_id="history-integration")


@pytest.fixture
async def clock() -> Clock:
    clock = Clock()
    clock.now = 1_000_000.0
    return clock


@pytest.fixture
async def auto(clock: Clock) -> AsyncIterator[Served]:
    async with served("auto", clock) as hookd:
        yield hookd


def history_of(messages: list[Any], count: int) -> list[bytes]:
    return [sticky.canonical(m) for m in messages[:count]]


async def test_a_cold_turn_rewrites_history_once_and_later_turns_send_it_again(auto: Served, clock: Clock) -> None:
    answers = []
    for turns in range(1, 6):
        clock.now += 3.0
        answers.append(await auto.send(call(turns)))
        assert "rewrite=-" in answers[-1].line
    clock.now += 10 * 60
    cold = await auto.send(call(6))
    assert "rewrite=cold" in cold.line
    before = history_of(answers[-1].messages, len(answers[-1].messages))
    after = history_of(cold.messages, len(before))
    assert before != after, "the cold turn sent the history in a new form"
    # The file read twice: the first copy is superseded by the second one.
    assert len(sticky.canonical(cold.messages[2])) < len(sticky.canonical(answers[-1].messages[2])) / 2
    clock.now += 3.0
    warm = await auto.send(call(7))
    assert "rewrite=-" in warm.line
    assert history_of(warm.messages, len(cold.messages)) == history_of(cold.messages, len(cold.messages))


async def clear_notes(hookd: Served, clock: Clock, upto: int) -> dict[int, Any]:
    """Replay the first turns warm, then a cold turn: the notes sent on it, by message (whether a
    warm batch or the cold turn cleared them)."""
    hookd.hook.store.update({"history_keep": 2}, profiles=None)
    lines = []
    for turns in range(1, upto):
        clock.now += 3.0
        lines.append((await hookd.send(call(turns))).line)
    clock.now += 10 * 60
    cold = await hookd.send(call(upto))
    assert any("rewrite=batch" in line or "rewrite=cold" in line for line in [*lines, cold.line])
    return {i: m for i, m in enumerate(cold.messages) if "[hookd cleared" in str(m)}


async def test_clear_mode_notes_are_the_same_after_workers_and_hookd_are_replaced(clock: Clock) -> None:
    async with served("clear", clock) as hookd:
        notes = await clear_notes(hookd, clock, 7)
        assert notes
        for slot in range(len(hookd.pool.workers)):
            pid = hookd.worker_pid(slot)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert await hookd.pool.wait_ready(120)
        clock.now += 10 * 60
        later = await hookd.send(call(8))
        assert all(later.messages[i] == note for i, note in notes.items())
    async with served("clear", clock) as fresh:
        assert await clear_notes(fresh, clock, 7) == notes
