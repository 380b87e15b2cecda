"""The cache model: when a conversation's cache is cold, where a rewrite can still read from, how
long a conversation is expected to go on, and where a rewrite's breakpoint goes."""

from __future__ import annotations

from typing import Any

import pytest

from hookd import cache_model
from hookd.cache_model import CacheState
from hookd.prices import DEFAULT_TABLE

ANTHROPIC = DEFAULT_TABLE["anthropic"]
OPENAI = DEFAULT_TABLE["openai"]
MARK = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}


def message(role: str, text: str, control: dict[str, Any] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if control:
        block["cache_control"] = control
    return {"role": role, "content": [block]}


def claude_code_turn(count: int, control: dict[str, Any] = MARK) -> list[dict[str, Any]]:
    """`count` messages with Claude Code's breakpoints on the last two."""
    roles = ["user", "assistant"]
    return [message(roles[i % 2], f"m{i}", control if i >= count - 2 else None) for i in range(count)]


BODY = {"system": [{"type": "text", "text": "system", "cache_control": MARK}]}


def sent(state: CacheState, count: int, now: float, control: dict[str, Any] = MARK, unchanged: int = -1) -> None:
    messages = claude_code_turn(count, control)
    body = {"system": [{"type": "text", "text": "system", "cache_control": control}]}
    cache_model.observe(
        state, ANTHROPIC, now, cache_model.marks(body, messages), count - 2 if unchanged < 0 else unchanged
    )


def test_marks_are_message_boundaries_and_the_system_prefix() -> None:
    assert cache_model.marks(BODY, claude_code_turn(6)) == [(0, False), (5, False), (6, False)]
    assert cache_model.marks({}, claude_code_turn(4, HOUR)) == [(3, True), (4, True)]
    assert cache_model.marks({}, [message("user", "no breakpoints")]) == []


def test_a_cache_is_cold_only_past_its_ttl_and_a_margin() -> None:
    state = CacheState()
    assert not cache_model.cold(state, ANTHROPIC, 0.0)  # nothing sent yet: no cache, no "cold turn"
    sent(state, 4, now=1000.0)
    assert not cache_model.cold(state, ANTHROPIC, 1000.0 + 300 + cache_model.COLD_MARGIN_S - 1)
    assert cache_model.cold(state, ANTHROPIC, 1000.0 + 300 + cache_model.COLD_MARGIN_S + 1)


def test_one_hour_breakpoints_keep_the_cache_warm_for_an_hour() -> None:
    state = CacheState()
    sent(state, 4, now=0.0, control=HOUR)
    assert not cache_model.cold(state, ANTHROPIC, 10 * 60.0)
    assert not cache_model.cold(state, ANTHROPIC, 59 * 60.0)
    assert cache_model.cold(state, ANTHROPIC, 62 * 60.0)


def test_an_automatic_cache_goes_cold_after_idle_eviction() -> None:
    state = CacheState()
    cache_model.observe(state, OPENAI, 0.0, [], 0)
    assert not cache_model.cold(state, OPENAI, 200.0)
    assert cache_model.cold(state, OPENAI, 400.0)


def test_a_rewrite_reads_from_the_latest_live_entry_before_its_cut() -> None:
    state = CacheState()
    for turn, count in enumerate(range(4, 20, 2)):
        sent(state, count, now=10.0 * turn)
    now = 75.0
    assert cache_model.read_point(state, ANTHROPIC, 11, now) == 11
    assert cache_model.read_point(state, ANTHROPIC, 10, now) == 10
    # Entries written more than five minutes ago are gone; the system prefix is always rewritten.
    later = 10.0 * 7 + 300 - 30
    assert cache_model.read_point(state, ANTHROPIC, 8, later) == 0
    # An automatic cache holds every prefix of what was sent while it is warm.
    auto = CacheState()
    cache_model.observe(auto, OPENAI, 0.0, [], 0)
    assert cache_model.read_point(auto, OPENAI, 37, 100.0) == 37
    assert cache_model.read_point(auto, OPENAI, 37, 400.0) is None


def test_the_system_entry_outlives_many_message_entries() -> None:
    state = CacheState()
    for turn, count in enumerate(range(4, 4 + 2 * cache_model.MAX_ENTRIES, 2)):
        sent(state, count, now=float(turn))
    assert len(state.entries) <= cache_model.MAX_ENTRIES
    assert state.entries[0].boundary == 0


def test_remaining_requests_grow_with_the_conversation_within_bounds() -> None:
    state = CacheState(requests=3)
    assert cache_model.remaining(state) == cache_model.REMAINING_FLOOR
    state.requests = 40
    assert cache_model.remaining(state) == 20  # half the Lindy median: the gain is uncertain, the cost is not
    state.requests = 1000
    assert cache_model.remaining(state) == cache_model.REMAINING_CAP
    # A conversation that keeps going cold earns less from a warm rewrite.
    state.colds = 99
    assert cache_model.remaining(state) < 25


def test_a_rewrite_pays_when_it_saves_much_and_rewrites_little() -> None:
    state = CacheState(requests=20)
    assert cache_model.value(ANTHROPIC, state, saved=30_000, rewritten=5_000, margin=1.5) > 0
    assert cache_model.value(ANTHROPIC, state, saved=3_000, rewritten=100_000, margin=1.5) < 0
    # No write premium (OpenAI): the same rewrite pays sooner.
    assert cache_model.value(OPENAI, state, saved=3_000, rewritten=20_000, margin=1.5) > cache_model.value(
        ANTHROPIC, state, saved=3_000, rewritten=20_000, margin=1.5
    )


def count_marks(messages: list[dict[str, Any]]) -> int:
    return sum("cache_control" in block for m in messages for block in m["content"])


def test_a_breakpoint_goes_at_the_read_point() -> None:
    messages = claude_code_turn(10)
    assert cache_model.place_breakpoint(messages, 6, long=False, head=1)
    assert messages[5]["content"][-1]["cache_control"] == MARK
    assert count_marks(messages) + 1 == 4


def test_with_four_breakpoints_the_next_to_last_message_gives_way() -> None:
    messages = claude_code_turn(10)
    assert cache_model.place_breakpoint(messages, 6, long=False, head=2)
    assert count_marks(messages) + 2 == 4
    assert "cache_control" in messages[5]["content"][-1]
    assert "cache_control" not in messages[8]["content"][-1]
    assert "cache_control" in messages[9]["content"][-1]


def test_a_breakpoint_before_one_hour_breakpoints_asks_for_an_hour() -> None:
    messages = claude_code_turn(10, HOUR)
    assert cache_model.place_breakpoint(messages, 4, long=False, head=1)
    assert messages[3]["content"][-1]["cache_control"] == HOUR


@pytest.mark.parametrize("content", ["a plain string has no block to mark", []])
def test_no_breakpoint_where_there_is_no_block(content: Any) -> None:
    messages = [*claude_code_turn(4), {"role": "user", "content": content}, *claude_code_turn(2)]
    assert not cache_model.place_breakpoint(messages, 5, long=False, head=1)


def test_entries_past_a_rewrite_are_forgotten() -> None:
    state = CacheState()
    for turn, count in enumerate(range(4, 20, 2)):
        sent(state, count, now=float(turn))
    # History changed from message 6 on: the entries at later boundaries cache what is gone.
    sent(state, 20, now=9.0, unchanged=6)
    assert [e.boundary for e in state.entries] == [0, 3, 4, 5, 6, 19, 20]
    assert cache_model.read_point(state, ANTHROPIC, 12, 10.0) == 6


def test_state_survives_a_round_trip() -> None:
    state = CacheState()
    sent(state, 6, now=5.0, control=HOUR)
    state.last_rewrite = 1
    assert CacheState.from_json(state.as_json()) == state
