"""Sticky mode through the hook handler (fake compressor): history goes out byte for byte as it
did last turn, only new messages are compressed, and any doubt starts a fresh record."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from hookd import sticky
from tests import client
from tests.fakes import Start

LONG = "output line\n" * 200


def conversation(turns: int, marked: bool = True) -> list[dict[str, Any]]:
    """Claude Code's shape: tool calls and results, breakpoints on the last two messages."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "start"}]
    for turn in range(turns):
        tool_id = f"toolu_{turn}"
        messages.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": {}}]}
        )
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": f"{turn} {LONG}"}]}
        )
    if marked:
        for message in messages[-2:]:
            message["content"] = [{**block, "cache_control": {"type": "ephemeral"}} for block in _blocks(message)]
    return messages


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]


def call(messages: list[dict[str, Any]], session: str = "s1") -> dict[str, Any]:
    return {"metadata": {"session_id": session, "model": "claude-sonnet-4-5"}, "request_body": {"messages": messages}}


async def send(session: aiohttp.ClientSession, url: str, messages: list[Any], sid: str = "s1") -> list[Any]:
    _, _, answer = await client.post(session, url, call(messages, sid))
    return answer["request_body"]["messages"] if answer["action"] == "modify" else messages


def same_prefix(before: list[Any], after: list[Any]) -> bool:
    return [sticky.canonical(m) for m in after[: len(before)]] == [sticky.canonical(m) for m in before]


async def test_history_is_sent_again_byte_for_byte(start: Start) -> None:
    url, fake, session = await start()
    first = await send(session, url, conversation(2))
    second = await send(session, url, conversation(3))
    third = await send(session, url, conversation(4))
    assert same_prefix(first, second) and same_prefix(second, third)
    assert [job.frozen > 0 for job in fake.jobs] == [False, True, True]
    # Only the new messages and a little context go to the worker.
    assert len(fake.jobs[2].messages) - fake.jobs[2].frozen == 2


async def test_new_messages_keep_their_breakpoints_and_are_compressed(start: Start) -> None:
    url, _, session = await start()
    await send(session, url, conversation(1))
    out = await send(session, url, conversation(2))
    last = out[-1]["content"][0]
    assert last["cache_control"] == {"type": "ephemeral"}
    assert last["content"].endswith("[cut]")
    # The message that carried a breakpoint last turn carries none now, as the client sent it.
    assert "cache_control" not in out[-3]["content"][0]


async def test_an_edited_history_falls_back_to_full_compression(start: Start) -> None:
    url, fake, session = await start()
    await send(session, url, conversation(2))
    edited = conversation(3)
    edited[0]["content"] = "start, but different"
    await send(session, url, edited)
    assert fake.jobs[-1].frozen == 0
    await send(session, url, edited + conversation(4)[-2:])
    assert fake.jobs[-1].frozen > 0


async def test_a_retry_is_answered_without_the_worker(start: Start) -> None:
    url, fake, session = await start()
    first = await send(session, url, conversation(2))
    again = await send(session, url, conversation(2))
    assert len(fake.jobs) == 1
    assert [sticky.canonical(m) for m in again] == [sticky.canonical(m) for m in first]


@pytest.mark.parametrize("failure", ["error", "overload", "drop-message"])
async def test_a_failed_turn_sends_last_turns_history_again(
    start: Start, failure: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, fake, session = await start(verbose=True)
    first = await send(session, url, conversation(2))
    fake.mode = failure
    second = await send(session, url, conversation(3))
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("-> modify(history)")
    assert same_prefix(first, second)
    # The new messages went out as they came, and stay that way.
    assert second[-2:] == conversation(3)[-2:]
    fake.mode = "shorten"
    third = await send(session, url, conversation(4))
    assert same_prefix(second, third)
    assert fake.jobs[-1].frozen > 0


async def test_a_failed_first_turn_is_an_allow_and_its_messages_stay_as_sent(start: Start) -> None:
    url, fake, session = await start()
    fake.mode = "error"
    assert await send(session, url, conversation(2)) == conversation(2)
    fake.mode = "shorten"
    second = await send(session, url, conversation(3))
    assert same_prefix(conversation(2), second)
    assert fake.jobs[-1].frozen > 0


@pytest.mark.parametrize(("mode", "keeps_history"), [("sticky", True), ("auto", True), ("plain", False)])
async def test_only_plain_mode_compresses_history_again(start: Start, mode: str, keeps_history: bool) -> None:
    url, fake, session = await start()
    async with session.put(url + "config", json={"history": mode}) as response:
        assert response.status == 200
    await send(session, url, conversation(2))
    await send(session, url, conversation(3))
    assert (fake.jobs[-1].frozen > 0) is keeps_history
    # The history policy's modes fold new output against the whole conversation.
    assert fake.jobs[-1].dedup is (mode == "auto")


async def test_sub_agents_sharing_a_session_id_keep_separate_histories(start: Start) -> None:
    url, fake, session = await start()
    main, sub = conversation(2), conversation(2)
    sub[0]["content"] = "sub-agent task"
    await send(session, url, main, "shared")
    await send(session, url, sub, "shared")
    await send(session, url, main + conversation(3)[-2:], "shared")
    await send(session, url, sub + conversation(3)[-2:], "shared")
    assert [job.frozen > 0 for job in fake.jobs] == [False, False, True, True]
