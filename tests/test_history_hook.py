"""The history policy through the hook handler (fake compressor, a clock the test moves): history
is replaced only in batches that pay or on a cold turn, the replaced history is what later turns
send again byte for byte, breakpoints keep the rest of the cache, and `/config` controls it."""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any

import aiohttp
import pytest

from hookd import sticky
from tests import client
from tests.fakes import Start

MARK = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def conversation(
    turns: int,
    output: str = "output line\n" * 400,
    control: dict[str, Any] | None = MARK,
    stale: set[int] = frozenset(),
) -> list[dict[str, Any]]:
    """Claude Code's shape: a tool call and its result per turn, breakpoints on the last two."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "start"}]
    for turn in range(turns):
        tool_id = f"toolu_{turn}"
        text = ("STALE " if turn in stale else "") + f"{turn} {output}"
        messages.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": tool_id, "name": "Bash", "input": {}}]}
        )
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": text}]})
    if control is not None:
        for message in messages[-2:]:
            message["content"] = [{**block, "cache_control": control} for block in message["content"]]
    return messages


def call(messages: list[dict[str, Any]], control: dict[str, Any] | None = MARK) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "messages": messages}
    if control is not None:
        body["system"] = [{"type": "text", "text": "You are an agent.", "cache_control": control}]
    return {
        "metadata": {"session_id": "s1", "model": "claude-sonnet-4-5", "provider": "anthropic"},
        "request_body": body,
    }


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    _, _, answer = await client.post(session, url, body)
    # Background work (a rewrite candidate) runs once the answer is out, as during a real reply.
    await asyncio.sleep(0.05)
    return answer["request_body"]["messages"] if answer["action"] == "modify" else body["request_body"]["messages"]


async def rewrites(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "metrics") as response:
        text = await response.text()
    found = re.findall(r'hookd_history_rewrites_total\{reason="(\w+)"\} ([0-9.]+)', text)
    return {reason: float(count) for reason, count in found}


def canonical(messages: list[Any]) -> list[bytes]:
    return [sticky.canonical(m) for m in messages]


def changed(before: list[Any], after: list[Any]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(canonical(before), canonical(after), strict=False)) if a != b]


async def replay(
    start: Start, mode: str, turns: int, clock: Clock, step: float = 2.0, **shape: Any
) -> tuple[list[list[Any]], str, aiohttp.ClientSession]:
    url, _, session = await start(mode, clock=clock)
    sent = []
    for turn in range(1, turns + 1):
        clock.now += step
        sent.append(await send(session, url, call(conversation(turn, **shape), shape.get("control", MARK))))
    return sent, url, session


async def test_aged_history_is_replaced_in_a_batch_that_pays_and_then_sent_again(start: Start) -> None:
    clock = Clock()
    sent, url, session = await replay(start, "aging", 16, clock)
    rewritten = [t for t in range(1, len(sent)) if changed(sent[t - 1], sent[t])]
    assert rewritten, "aged output was never replaced"
    first = rewritten[0]
    assert len(changed(sent[first - 1], sent[first])) >= 2, "a rewrite is a batch, never one message"
    assert not changed(sent[first], sent[first + 1]), "the turn after a rewrite sends the rewritten history again"
    assert (await rewrites(session, url)).get("batch") == len(rewritten)


async def test_a_small_gain_far_back_does_not_pay(start: Start) -> None:
    clock = Clock()
    sent, url, session = await replay(start, "stale", 24, clock, output="x" * 20_000 + "\n", stale={0, 1})
    assert all(not changed(sent[t - 1], sent[t]) for t in range(1, len(sent)))
    assert await rewrites(session, url) == {}


async def test_a_large_gain_near_the_end_pays(start: Start) -> None:
    clock = Clock()
    sent, url, session = await replay(start, "stale", 24, clock, output="x" * 20_000 + "\n", stale={20, 21})
    assert (await rewrites(session, url)).get("batch") == 1
    last = sent[-1]
    assert all(len(sticky.canonical(last[i])) < 1000 for i in (42, 44))


async def test_no_rewrite_again_within_the_interval(start: Start) -> None:
    clock = Clock()
    url, _, session = await start("aging", clock=clock)
    async with session.put(url + "config", json={"history_interval": 6}) as response:
        assert response.status == 200
    sent = []
    for turn in range(1, 30):
        clock.now += 2.0
        sent.append(await send(session, url, call(conversation(turn))))
    rewritten = [t for t in range(1, len(sent)) if changed(sent[t - 1], sent[t])]
    assert len(rewritten) >= 2
    assert all(b - a >= 6 for a, b in itertools.pairwise(rewritten))


async def test_a_cold_turn_rewrites_the_whole_history(start: Start) -> None:
    clock = Clock()
    url, _, session = await start("aging", clock=clock)
    for turn in range(1, 4):
        clock.now += 2.0
        before = await send(session, url, call(conversation(turn)))
    clock.now += 300 + 61 + 1
    after = await send(session, url, call(conversation(4)))
    assert changed(before, after) == [2, 4]
    assert (await rewrites(session, url)).get("cold") == 1


@pytest.mark.parametrize(("idle", "cold"), [(10 * 60, False), (61 * 60 + 1, True)])
async def test_one_hour_breakpoints_stay_warm_for_an_hour(start: Start, idle: float, cold: bool) -> None:
    clock = Clock()
    url, _, session = await start("aging", clock=clock)
    for turn in range(1, 4):
        clock.now += 2.0
        await send(session, url, call(conversation(turn, control=HOUR), HOUR))
    clock.now += idle
    await send(session, url, call(conversation(4, control=HOUR), HOUR))
    assert ((await rewrites(session, url)).get("cold") == 1) is cold


def breakpoints(body: dict[str, Any], messages: list[Any]) -> list[str]:
    where = [f"system[{i}]" for i, b in enumerate(body.get("system") or []) if "cache_control" in b]
    where += [f"tools[{i}]" for i, b in enumerate(body.get("tools") or []) if "cache_control" in b]
    for index, message in enumerate(messages):
        content = message["content"] if isinstance(message["content"], list) else []
        where += [f"messages[{index}]" for block in content if "cache_control" in block]
    return where


@pytest.mark.parametrize("tools_marked", [False, True])
async def test_a_batch_rewrite_places_a_breakpoint_within_the_limit_of_four(start: Start, tools_marked: bool) -> None:
    clock = Clock()
    url, _, session = await start("aging", clock=clock)
    previous: list[Any] = []
    for turn in range(1, 30):
        clock.now += 2.0
        body = call(conversation(turn))
        if tools_marked:
            body["request_body"]["tools"] = [{"name": "Bash", "input_schema": {}, "cache_control": MARK}]
        messages = await send(session, url, body)
        cut = changed(previous, messages)
        previous = messages
        if cut:
            break
    assert cut, "no batch rewrite happened"
    marks = breakpoints(body["request_body"], messages)
    assert len(marks) == 4
    # The unchanged prefix ends at a breakpoint, so the provider reads it from cache.
    assert f"messages[{cut[0] - 1}]" in marks
    assert f"messages[{len(messages) - 1}]" in marks


async def test_no_breakpoint_is_added_to_a_request_that_carries_none(start: Start) -> None:
    clock = Clock()
    url, _, session = await start("aging", clock=clock)
    previous: list[Any] = []
    rewrote = False
    for turn in range(1, 30):
        clock.now += 2.0
        body = call(conversation(turn, control=None), None)
        messages = await send(session, url, body)
        rewrote = rewrote or bool(changed(previous, messages))
        assert breakpoints(body["request_body"], messages) == []
        previous = messages
    assert rewrote


async def test_clear_mode_notes_are_the_same_every_turn_and_after_a_restart(start: Start) -> None:
    clock = Clock()
    sent, _, _ = await replay(start, "same", 20, clock)
    assert not any("[hookd cleared" in str(m) for m in sent[-1])  # auto never clears
    clock = Clock()
    sent, url, session = await replay(start, "same", 20, clock, step=400.0)
    async with session.put(url + "config", json={"history": "clear"}) as response:
        assert response.status == 200
    clock.now += 400
    first = await send(session, url, call(conversation(21)))
    notes = {i: m for i, m in enumerate(first) if "[hookd cleared" in str(m)}
    assert notes, "a cold turn in clear mode clears old output"
    for turn in (22, 23):
        clock.now += 2
        later = await send(session, url, call(conversation(turn)))
        assert all(later[i] == m for i, m in notes.items())
    # A new hookd (every worker new too) writes the same notes on its first cold turn.
    url, _, session = await start("same", clock=clock)
    async with session.put(url + "config", json={"history": "clear"}) as response:
        assert response.status == 200
    await send(session, url, call(conversation(23)))
    clock.now += 400
    again = await send(session, url, call(conversation(24)))
    assert all(again[i] == m for i, m in notes.items() if i < 40)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"history": "sometimes"}, "history must be one of sticky, plain, auto, clear"),
        ({"history_batch": 0}, "history_batch must be an integer"),
        ({"history_interval": "ten"}, "history_interval must be an integer"),
        ({"history_keep": -1}, "history_keep must be an integer"),
        ({"cache_prices": {"anthropic": {"read": 2}}}, "cache_prices.anthropic.read must be from 0 to 1"),
        ({"cache_prices": {"anthropic": {"tll": 300}}}, "cache_prices.anthropic.tll is not a price field"),
        ({"cache_prices": []}, "cache_prices must be an object"),
        ({"sticky": False}, "sticky was replaced by history"),
    ],
)
async def test_bad_history_settings_are_refused(start: Start, change: dict[str, Any], complaint: str) -> None:
    url, _, session = await start()
    async with session.put(url + "config", json=change) as response:
        assert response.status == 400
        assert complaint in (await response.json())["error"]
    async with session.get(url + "config") as response:
        document = await response.json()
    assert document["history"] == "auto"


async def test_config_shows_the_price_table_and_takes_overrides(start: Start) -> None:
    url, _, session = await start()
    async with session.get(url + "config") as response:
        table = (await response.json())["cache_prices"]
    assert table["anthropic"]["read"] == 0.1 and table["anthropic"]["write"] == 1.25
    assert table["anthropic"]["write_long"] == 2.0 and table["anthropic"]["ttl_long"] == 3600
    assert table["openai"]["write"] == 1.0
    async with session.put(url + "config", json={"cache_prices": {"anthropic": {"read": 0.05}}}) as response:
        assert response.status == 200
        table = (await response.json())["cache_prices"]
    assert table["anthropic"]["read"] == 0.05 and table["anthropic"]["write"] == 1.25
