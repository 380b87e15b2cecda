"""The history policy's choices (no compression involved): which forms, whether a warm rewrite
pays, from where, how often, and what a cold turn does."""

from __future__ import annotations

from typing import Any

from hookd import cache_model, history
from hookd.cache_model import CacheState
from hookd.prices import DEFAULT_TABLE

ANTHROPIC = DEFAULT_TABLE["anthropic"]
KB = 1024


def text(role: str, size: int, fill: str = "x") -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": fill * size}]}


def sizes_of(messages: list[Any]) -> list[int]:
    return [history._size(m) for m in messages]


def warm_state(requests: int, count: int, now: float) -> CacheState:
    """A conversation whose every message boundary was cached within the last minute."""
    state = CacheState()
    for step in range(requests):
        boundary = max(2, count - 2 * (requests - 1 - step))
        at = now - 2.0 * (requests - step)
        cache_model.observe(state, ANTHROPIC, at, [(0, False), (boundary - 1, False), (boundary, False)], boundary)
    return state


def history_of(count: int, size: int) -> list[dict[str, Any]]:
    return [text("user" if i % 2 == 0 else "assistant", size) for i in range(count)]


def test_only_smaller_forms_are_chosen() -> None:
    sent = history_of(6, 4 * KB)
    candidate = {2: text("user", 100), 3: text("assistant", 8 * KB)}
    forms = history.choose(history.Knobs(), candidate, sent, sizes_of(sent), sent)
    assert set(forms) == {2}


def test_a_large_saving_near_the_end_pays() -> None:
    sent = history_of(30, 2 * KB)
    sent[24] = sent[26] = text("user", 40 * KB)
    forms = {24: text("user", 200), 26: text("user", 200)}
    state = warm_state(requests=15, count=30, now=1000.0)
    plan = history.plan_batch(history.Knobs(), forms, sizes_of(sent), state, ANTHROPIC, 1000.0)
    assert plan is not None and plan.reason == "batch"
    assert plan.start == 24 and plan.read_point == 24 and set(plan.forms) == {24, 26}
    assert plan.saved_tokens > 20_000


def test_a_small_saving_far_back_does_not_pay() -> None:
    sent = history_of(30, 8 * KB)
    forms = {2: text("user", 4 * KB), 3: text("assistant", 4 * KB)}
    state = warm_state(requests=15, count=30, now=1000.0)
    assert history.plan_batch(history.Knobs(), forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is None


def test_when_the_cache_is_unreadable_before_the_cut_nothing_pays_warm() -> None:
    sent = history_of(30, 2 * KB)
    sent[24] = sent[26] = text("user", 40 * KB)
    forms = {24: text("user", 200), 26: text("user", 200)}
    state = CacheState(requests=15)  # no live entry at all
    assert history.plan_batch(history.Knobs(), forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is None


def test_never_again_right_after_a_rewrite() -> None:
    sent = history_of(30, 2 * KB)
    sent[24] = sent[26] = text("user", 40 * KB)
    forms = {24: text("user", 200), 26: text("user", 200)}
    state = warm_state(requests=15, count=30, now=1000.0)
    knobs = history.Knobs(interval=10)
    state.last_rewrite = state.requests - 9
    assert history.plan_batch(knobs, forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is None
    state.last_rewrite = state.requests - 10
    assert history.plan_batch(knobs, forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is not None


def test_never_one_message_at_a_time() -> None:
    sent = history_of(30, 2 * KB)
    sent[26] = text("user", 80 * KB)
    forms = {26: text("user", 200)}
    state = warm_state(requests=15, count=30, now=1000.0)
    assert history.plan_batch(history.Knobs(batch=2), forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is None
    assert history.plan_batch(history.Knobs(batch=1), forms, sizes_of(sent), state, ANTHROPIC, 1000.0) is not None


def test_a_cold_turn_takes_every_smaller_form() -> None:
    sent = history_of(10, 4 * KB)
    forms = {1: text("assistant", 100), 7: text("assistant", 100)}
    plan = history.plan_cold(history.Knobs(), forms, sizes_of(sent))
    assert plan is not None and plan.reason == "cold" and plan.read_point == 0
    assert plan.start == 1 and set(plan.forms) == {1, 7}
    assert history.plan_cold(history.Knobs(), {}, sizes_of(sent)) is None


def pointer_to(target: int, anchor: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": f"[↑5L same as msg {target}: {anchor!r}]"}]}


def test_a_change_that_would_leave_a_pointer_dangling_is_not_made() -> None:
    sent = [text("user", 10, "def handler(request)\n"), text("assistant", 10), pointer_to(0, "def handler(reques...")]
    # The message the pointer names would lose the text it points to.
    forms = {0: text("user", 1, "short")}
    assert history.consistent(forms, sent) == {}
    # A change elsewhere is fine.
    assert history.consistent({1: text("assistant", 1)}, sent) == {1: text("assistant", 1)}


def test_clear_mode_adds_notes_for_old_tool_output() -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for i in range(14):
        messages.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}", "name": "Bash", "input": {}}]}
        )
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "out\n" * 400}]}
        )
    sizes = sizes_of(messages)
    auto = history.choose(history.Knobs(mode="auto"), {}, messages, sizes, messages)
    clear = history.choose(history.Knobs(mode="clear", keep=10), {}, messages, sizes, messages)
    assert auto == {}
    assert sorted(clear) == [2, 4, 6, 8]
