"""Sticky mode's memory: comparing turns, rendering history again, and staying bounded."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest

from hookd import sticky

MARK = {"type": "ephemeral"}


def user(text: str, marked: bool = False) -> dict[str, Any]:
    if marked:
        return {"role": "user", "content": [{"type": "text", "text": text, "cache_control": MARK}]}
    return {"role": "user", "content": text}


def tool_result(tool_id: str, text: str, marked: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id, "content": text}
    if marked:
        block["cache_control"] = MARK
    return {"role": "user", "content": [block]}


def test_a_moved_breakpoint_does_not_change_a_message() -> None:
    assert sticky.canonical(user("hello", marked=True)) == sticky.canonical(user("hello"))
    assert sticky.canonical(tool_result("t1", "out", marked=True)) == sticky.canonical(tool_result("t1", "out"))
    assert sticky.canonical(user("hello")) != sticky.canonical(user("hello!"))


def test_key_order_does_not_change_a_message() -> None:
    assert sticky.canonical({"role": "user", "content": "x"}) == sticky.canonical({"content": "x", "role": "user"})


def test_digests_are_sixteen_bytes_a_message() -> None:
    messages = [user("a"), user("b"), tool_result("t", "c")]
    assert len(sticky.digests(messages)) == 3 * sticky.DIGEST
    assert sticky.digests(messages[:2]) == sticky.digests(messages)[: 2 * sticky.DIGEST]


def test_sub_agents_sharing_a_session_get_their_own_record() -> None:
    one = sticky.digests([user("main agent task")])
    other = sticky.digests([user("sub-agent task")])
    assert sticky.record_key(b"session", one) != sticky.record_key(b"session", other)


def record_for(messages: list[Any], emitted: dict[int, bytes] | None = None) -> sticky.Record:
    return sticky.Record(digests=sticky.digests(messages), emitted=emitted or {})


def test_lookup_finds_the_record_whose_history_starts_this_request() -> None:
    store = sticky.Store(max_bytes=1 << 20, ttl=60)
    history = [user("a"), user("b")]
    store.commit(b"k", record_for(history))
    assert store.lookup(b"k", sticky.digests([*history, user("c")])) is not None
    assert store.lookup(b"k", sticky.digests(history)) is not None


def test_an_edited_history_drops_the_record() -> None:
    store = sticky.Store(max_bytes=1 << 20, ttl=60)
    store.commit(b"k", record_for([user("a"), user("b")]))
    assert store.lookup(b"k", sticky.digests([user("a"), user("B"), user("c")])) is None
    assert len(store) == 0 and store.bytes == 0


def test_a_rewind_drops_the_record() -> None:
    store = sticky.Store(max_bytes=1 << 20, ttl=60)
    store.commit(b"k", record_for([user("a"), user("b"), user("c")]))
    assert store.lookup(b"k", sticky.digests([user("a")])) is None


def test_records_expire_after_the_ttl() -> None:
    now = [0.0]
    store = sticky.Store(max_bytes=1 << 20, ttl=300, clock=lambda: now[0])
    store.commit(b"k", record_for([user("a")]))
    now[0] = 299
    assert store.lookup(b"k", sticky.digests([user("a")])) is not None
    now[0] = 299 + 301
    assert store.lookup(b"k", sticky.digests([user("a")])) is None
    assert store.bytes == 0


def test_least_recently_used_records_go_first_when_memory_is_full() -> None:
    big = {0: b"x" * 1000}
    store = sticky.Store(max_bytes=3 * record_for([user("a")], dict(big)).size, ttl=60)
    for name in (b"a", b"b", b"c"):
        store.commit(name, record_for([user(name.decode())], dict(big)))
    assert store.lookup(b"a", sticky.digests([user("a")])) is not None
    store.commit(b"d", record_for([user("d")], dict(big)))
    assert set(store.records) == {b"a", b"c", b"d"}
    assert store.bytes <= store.max_bytes


def test_the_memory_records_take_is_about_what_they_count() -> None:
    """--sticky-max-mb bounds real memory only if a record's count is near what it holds
    (orjson's 8 KiB output buffers once made it ~10x)."""
    store = sticky.Store(max_bytes=1 << 30, ttl=60)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            originals = [user(f"start {n}"), tool_result(f"t{n}", "x" * 400)]
            sent = [originals[0], tool_result(f"t{n}", "short")]
            store.commit(str(n).encode(), sticky.remember(None, sticky.digests(originals), originals, sent))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * store.bytes, (held, store.bytes)


def test_a_record_larger_than_the_budget_is_not_kept() -> None:
    store = sticky.Store(max_bytes=100, ttl=60)
    store.commit(b"k", record_for([user("a")], {0: b"x" * 500}))
    assert len(store) == 0 and store.bytes == 0


def test_render_puts_this_turns_breakpoints_on_last_turns_bytes() -> None:
    compressed = tool_result("t1", "short")
    stored = orjson.dumps(compressed)
    again = sticky.render(stored, tool_result("t1", "a very long original output", marked=True))
    assert again["content"][0]["content"] == "short"
    assert again["content"][0]["cache_control"] == MARK
    assert sticky.canonical(again) == sticky.canonical(compressed)


def test_render_wraps_text_when_the_client_marked_it() -> None:
    again = sticky.render(orjson.dumps(user("short")), user("a long original", marked=True))
    assert again["content"] == [{"type": "text", "text": "short", "cache_control": MARK}]
    assert sticky.render(orjson.dumps(user("short")), user("a long original")) == user("short")


def test_remember_keeps_bytes_only_for_messages_that_changed() -> None:
    originals = [user("a"), tool_result("t", "long output " * 50), user("b", marked=True)]
    sent = [originals[0], tool_result("t", "short"), originals[2]]
    record = sticky.remember(None, sticky.digests(originals), originals, sent)
    assert set(record.emitted) == {1}
    assert orjson.loads(record.emitted[1]) == tool_result("t", "short")
    later = [*originals, user("c")]
    extended = sticky.remember(record, sticky.digests(later), later, [*sent, later[3]])
    assert set(extended.emitted) == {1} and extended.count == 4


@pytest.mark.parametrize("value", [user("a", marked=True), [tool_result("t", "x", marked=True)], "text", 3])
def test_strip_removes_every_breakpoint(value: Any) -> None:
    assert b"cache_control" not in orjson.dumps(sticky.strip_cache_control(value))
