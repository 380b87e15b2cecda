"""`POST /events`: Aperture's `entire_request` events matched to the hook calls before them, and
the bill they report counted per provider, model and user, to the token.

The app runs in this process with a fake compressor (`tests.fakes`); each test sends hook calls
with Aperture's request ids, then the events a provider's response would produce, and reads the
counters from `/metrics` as an operator's Prometheus would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hookd import cli
from hookd import events as events_endpoint
from hookd.ledger import Facts
from hookd.prices import Usage
from tests import aperture_events
from tests.aperture_events import SECRET_TEXT, SHAPES
from tests.usage_app import USER, Served, Servers, by_kind, value

ANTHROPIC_BILL = Usage(input=1_200, cache_read=30_000, cache_write=2_500)
OPENAI_BILL = Usage(input=1_700, cache_read=30_080)


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    servers = Servers(tmp_path)
    yield servers.start
    await servers.close()


def outcomes(samples: dict[Any, float]) -> dict[str, float]:
    return {
        dict(labels)["outcome"]: count
        for (name, labels), count in samples.items()
        if name == "hookd_usage_events_total" and count
    }


def facts_of(served: Served, request_id: str) -> Facts:
    return served.hook.ledger.entries[request_id][1]


SHAPE_CASES = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if shape != "estimated-cost"]


@pytest.mark.parametrize(("shape", "with_cost"), SHAPE_CASES)
async def test_an_event_is_matched_to_its_hook_call_and_counted_to_the_token(
    serve: Callable[..., Any], shape: str, with_cost: bool, anthropic_messages: Any, openai_messages: Any
) -> None:
    served = await serve()
    provider = "openai" if shape.startswith("openai") else "anthropic"
    messages = anthropic_messages if provider == "anthropic" else openai_messages
    assert await served.call("req-1", messages, provider) == "modify"
    facts = facts_of(served, "req-1")
    removed = facts.tokens_before - facts.tokens_after
    assert removed > 0 and facts.removed_cached == facts.rewritten == 0
    bill = ANTHROPIC_BILL if provider == "anthropic" else OPENAI_BILL
    model = facts.model
    # Aperture's summary, when sent beside the provider's own usage, is the one left unread:
    # it is given different numbers here to show which one was counted.
    document = aperture_events.event(shape, "req-1", bill, provider, model, USER, estimated_cost=with_cost)
    if with_cost:
        document["metadata"]["estimated_cost"]["usage"]["input_tokens"] += 999
    assert await served.event(document) == 200

    samples = await served.metrics()
    who = {"provider": provider, "model": model, "user": USER}
    assert outcomes(samples) == {"matched": 1}
    assert value(samples, "hookd_usage_requests_total", **who, matched="true") == 1
    assert by_kind(samples, "hookd_billed_input_tokens_total", **who) == bill
    # The first turn of a conversation: every token hookd removed was new, so without hookd the
    # provider would have written it to the cache (Anthropic) or read it as input (OpenAI).
    if provider == "anthropic":
        without = dataclasses.replace(bill, cache_write=bill.cache_write + removed)
        weights = (1.0, 0.1, 1.25)
    else:
        without = dataclasses.replace(bill, input=bill.input + removed)
        weights = (1.0, 0.5, 1.0)
    assert by_kind(samples, "hookd_estimated_input_tokens_total", **who) == without
    weighted = value(samples, "hookd_estimated_input_weighted_tokens_total", **who)
    billed = value(samples, "hookd_billed_input_weighted_tokens_total", **who)
    expected = sum(
        w * k for w, k in zip(weights, (without.input, without.cache_read, without.cache_write), strict=True)
    )
    assert weighted == pytest.approx(expected)
    assert weighted - billed == pytest.approx(removed * (weights[2] if provider == "anthropic" else 1.0))
    assert value(samples, "hookd_removed_tokens_total", **who) == removed
    assert value(samples, "hookd_aperture_cost_dollars_total", **who) == (
        0.0042 if with_cost or shape == "estimated-cost" else 0
    )
    assert len(served.hook.ledger) == 0


async def test_history_the_provider_had_cached_would_have_been_read(
    serve: Callable[..., Any], anthropic_messages: Any
) -> None:
    now = [1000.0]
    served = await serve(clock=lambda: now[0])
    messages = anthropic_messages
    await served.call("turn-1", messages[:-2])
    first = facts_of(served, "turn-1")
    now[0] += 30  # well inside the provider's five minutes: its cache holds turn 1
    await served.call("turn-2", messages)
    second = facts_of(served, "turn-2")
    assert second.removed_cached == first.tokens_before - first.tokens_after > 0
    assert second.removed_new == (second.tokens_before - second.tokens_after) - second.removed_cached

    assert await served.event(aperture_events.event("anthropic-stream", "turn-2", ANTHROPIC_BILL)) == 200
    samples = await served.metrics()
    who = {"provider": "anthropic", "model": second.model, "user": USER}
    assert by_kind(samples, "hookd_estimated_input_tokens_total", **who) == Usage(
        input=ANTHROPIC_BILL.input,
        cache_read=ANTHROPIC_BILL.cache_read + second.removed_cached,
        cache_write=ANTHROPIC_BILL.cache_write + second.removed_new,
    )


async def test_an_event_for_a_request_hookd_never_answered_counts_as_billed_both_ways(
    serve: Callable[..., Any],
) -> None:
    served = await serve()
    document = aperture_events.event("openai", "never-seen", OPENAI_BILL, "openai", "gpt-4.1", "bob@example.com")
    assert await served.event(document) == 200
    samples = await served.metrics()
    who = {"provider": "openai", "model": "gpt-4.1", "user": "bob@example.com"}
    assert outcomes(samples) == {"unmatched": 1}
    assert value(samples, "hookd_usage_requests_total", **who, matched="false") == 1
    assert by_kind(samples, "hookd_billed_input_tokens_total", **who) == OPENAI_BILL
    assert by_kind(samples, "hookd_estimated_input_tokens_total", **who) == OPENAI_BILL


async def test_a_second_event_for_the_same_request_is_not_matched_twice(
    serve: Callable[..., Any], anthropic_messages: Any
) -> None:
    served = await serve()
    await served.call("req-1", anthropic_messages)
    document = aperture_events.event("anthropic", "req-1", ANTHROPIC_BILL)
    assert await served.event(document) == 200
    assert await served.event(document) == 200
    assert outcomes(await served.metrics()) == {"matched": 1, "unmatched": 1}


async def test_without_an_event_the_cache_model_is_counted_once_the_record_expires(
    serve: Callable[..., Any], anthropic_messages: Any
) -> None:
    served = await serve()
    ledger_time = [0.0]
    served.hook.ledger.clock = lambda: ledger_time[0]
    await served.call("quiet-1", anthropic_messages, session_id="quiet")
    facts = facts_of(served, "quiet-1")
    ledger_time[0] += served.hook.ledger.ttl + 1
    # The next request's record pushes the expired one out, as the periodic sweep would.
    await served.call("next-1", anthropic_messages[:3], session_id="next")
    samples = await served.metrics()
    who = {"provider": "anthropic", "model": facts.model, "user": USER}
    assert value(samples, "hookd_modelled_requests_total", **who) == 1
    assert by_kind(samples, "hookd_modelled_billed_input_tokens_total", **who) == facts.modelled
    assert by_kind(samples, "hookd_modelled_estimated_input_tokens_total", **who) == facts.modelled_without
    assert facts.modelled.total > 0
    assert value(samples, "hookd_removed_tokens_total", **who) == facts.tokens_before - facts.tokens_after
    assert value(samples, "hookd_usage_requests_total", **who, matched="true") == 0
    assert "quiet-1" not in served.hook.ledger.entries


async def test_events_need_the_hook_token_when_one_is_set(serve: Callable[..., Any]) -> None:
    served = await serve(hook_token="hook-secret")
    document = aperture_events.event("anthropic", "r", ANTHROPIC_BILL)
    assert await served.event(document) == 401
    assert await served.event(document, {"Authorization": "Bearer wrong"}) == 401
    assert await served.event(document, {"X-Api-Key": "hook-secret"}) == 200
    assert await served.event(document, {"Authorization": "Bearer hook-secret"}) == 200
    assert outcomes(await served.metrics()) == {"unauthorized": 2, "unmatched": 2}


async def test_compressed_events_are_decoded_like_hook_bodies(serve: Callable[..., Any]) -> None:
    served = await serve()
    for coding in ("gzip", "zstd", "br"):
        assert await served.event(aperture_events.event("openai", coding, OPENAI_BILL), coding=coding) == 200
    assert outcomes(await served.metrics()) == {"unmatched": 3}


async def test_users_are_hashed_with_the_key_and_bounded(serve: Callable[..., Any]) -> None:
    served = await serve(user_hash_key=b"a key of at least sixteen chars", max_user_labels=2)
    for user in ("ann@example.com", "bob@example.com", "cy@example.com", "ann@example.com"):
        document = aperture_events.event("openai", f"r-{user}", OPENAI_BILL, "openai", "gpt-4o", user)
        assert await served.event(document) == 200
    samples = await served.metrics()
    users = {
        dict(labels)["user"]: count
        for (name, labels), count in samples.items()
        if name == "hookd_usage_requests_total" and count
    }
    assert users.pop("other") == 1 and sorted(users.values()) == [1, 2]
    assert all(len(u) == 16 and "@" not in u for u in users)
    assert "example.com" not in repr(list(samples))


# -- hostile events --------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE: list[tuple[str, bytes, str | None, str]] = [
    ("garbage", b"\x00\xff not json at all", None, "invalid"),
    ("empty", b"", None, "invalid"),
    ("array", b"[1, 2, 3]", None, "invalid"),
    ("deep", DEEP, None, "invalid"),
    (
        "deep inside",
        b'{"metadata": {"request_id": "x"}, "response_body": ' + b'{"a":' * 900 + b"1" + b"}" * 901,
        None,
        "no-usage",
    ),
    ("missing everything", b"{}", None, "no-usage"),
    ("metadata only", orjson.dumps({"metadata": {"request_id": "req-kept"}}), None, "no-usage"),
    ("usage not an object", orjson.dumps({"response_body": {"usage": [1, 2]}}), None, "no-usage"),
    ("strings for counts", orjson.dumps({"response_body": {"usage": {"input_tokens": "12"}}}), None, "no-usage"),
    ("negative count", orjson.dumps({"response_body": {"usage": {"input_tokens": -5}}}), None, "no-usage"),
    ("absurd count", orjson.dumps({"response_body": {"usage": {"input_tokens": 10**15}}}), None, "no-usage"),
    ("booleans", orjson.dumps({"response_body": {"usage": {"input_tokens": True}}}), None, "no-usage"),
    (
        "cached over total",
        orjson.dumps({"response_body": {"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}}}}),
        None,
        "no-usage",
    ),
    (
        "wrong metadata types",
        orjson.dumps(
            {
                "metadata": {"request_id": 7, "login_name": ["x"], "model": {}},
                "response_body": {"usage": {"input_tokens": 3}},
            }
        ),
        None,
        "unmatched",
    ),
    ("raw_responses garbage", orjson.dumps({"raw_responses": [1, "x", None, {"usage": "no"}, [[]]]}), None, "no-usage"),
    ("corrupt gzip", b"\x1f\x8b\x08\x00garbage", "gzip", "decode-error"),
    ("bomb", gzip.compress(b"{" + b" " * (60 * 1024 * 1024) + b"}"), "gzip", "too-large"),
    ("unknown coding", b"{}", "compress", "encoding"),
]


@pytest.mark.parametrize(("case", "body", "coding", "outcome"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_events_are_answered_counted_and_forgotten(
    serve: Callable[..., Any], case: str, body: bytes, coding: str | None, outcome: str, anthropic_messages: Any
) -> None:
    served = await serve()
    await served.call("req-kept", anthropic_messages)
    # The body goes as it is, under the coding it claims.
    assert await served.event(body, {"Content-Encoding": coding} if coding else None) == 200
    samples = await served.metrics()
    assert outcomes(samples) == {outcome: 1}
    # The hook's record waits for a usable event; nothing else was added.
    assert list(served.hook.ledger.entries) == ["req-kept"]


async def test_a_body_over_the_cap_is_refused_unread(serve: Callable[..., Any]) -> None:
    served = await serve(max_wire_bytes=1024)
    assert await served.event(b"{" + b" " * 4096 + b"}") == 200
    assert outcomes(await served.metrics()) == {"too-large": 1}


async def test_other_methods_get_405(serve: Callable[..., Any]) -> None:
    served = await serve()
    async with served.http.get(served.url + "events") as response:
        assert response.status == 405 and response.headers["Allow"] == "POST"
    assert outcomes(await served.metrics()) == {"method": 1}


async def test_nothing_of_an_event_reaches_the_log_or_the_metrics(
    serve: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve()
    caplog.set_level("DEBUG")
    for shape in SHAPES:
        document = aperture_events.event(shape, f"r-{shape}", ANTHROPIC_BILL)
        document["metadata"]["session_id"] = SECRET_TEXT
        assert await served.event(document) == 200
    async with served.http.get(served.url + "metrics") as response:
        text = await response.text()
    assert SECRET_TEXT not in text and SECRET_TEXT not in caplog.text
    assert SECRET_TEXT not in repr(vars(served.hook.ledger))


async def test_a_flood_of_events_holds_no_state(serve: Callable[..., Any], anthropic_messages: Any) -> None:
    served = await serve()
    await served.call("req-kept", anthropic_messages)
    documents = [
        aperture_events.event(SHAPES[i % len(SHAPES)], f"unknown-{i}", ANTHROPIC_BILL, user=f"u{i % 500}@x")
        for i in range(2000)
    ]

    async def send(batch: list[dict[str, Any]]) -> list[int]:
        return [await served.event(d) for d in batch]

    statuses = await asyncio.gather(*(send(documents[i::8]) for i in range(8)))
    assert all(s == 200 for batch in statuses for s in batch)
    samples = await served.metrics()
    assert outcomes(samples) == {"unmatched": 2000}
    assert list(served.hook.ledger.entries) == ["req-kept"]
    users = {dict(labels)["user"] for (name, labels) in samples if name == "hookd_usage_requests_total"}
    assert len(users) == 201  # 200 of their own, then "other"


async def held_call(served: Served, messages: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, asyncio.Event]:
    """A hook call held inside the compressor until the returned event is set."""
    entered, release = asyncio.Event(), asyncio.Event()
    compress = served.hook.compressor.compress

    async def held(job: Any) -> Any:
        entered.set()
        await release.wait()
        return await compress(job)

    monkeypatch.setattr(served.hook.compressor, "compress", held)
    call = asyncio.create_task(served.call("req-held", messages))
    await entered.wait()
    return call, release


async def counted(served: Served, expected: dict[str, float], within: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while outcomes(await served.metrics()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.parametrize("delay", [60.0, 0.2])
async def test_an_event_during_a_hook_call_is_counted_after_the_call_or_the_delay(
    serve: Callable[..., Any], anthropic_messages: Any, monkeypatch: pytest.MonkeyPatch, delay: float
) -> None:
    monkeypatch.setattr(events_endpoint, "BACKLOG_DELAY_S", delay)
    served = await serve()
    call, release = await held_call(served, anthropic_messages, monkeypatch)
    assert await served.event(aperture_events.event("anthropic", "elsewhere", ANTHROPIC_BILL)) == 200
    if delay > 10:
        assert outcomes(await served.metrics()) == {}, "counted while a hook call was in progress"
        release.set()
        assert await call == "modify"
    # Counted once no hook call is in progress, or once it has waited `BACKLOG_DELAY_S`.
    assert await counted(served, {"unmatched": 1})
    release.set()
    assert await call == "modify"


async def test_a_bug_in_counting_costs_neither_the_event_nor_the_hook(
    serve: Callable[..., Any],
    anthropic_messages: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = await serve()

    def broken(*args: Any) -> None:
        raise KeyError(SECRET_TEXT)

    events = served.hook.ledger.unmatched.__self__  # the endpoint that counts for the ledger
    monkeypatch.setattr(events.metrics, "observed", broken)
    monkeypatch.setattr(events.metrics, "modelled_only", broken)
    assert await served.event(aperture_events.event("anthropic", "r", ANTHROPIC_BILL)) == 200
    served.hook.ledger.ttl = 0
    await served.call("one", anthropic_messages, session_id="one")
    # Noting the second request expires the first, whose counting fails inside the hook's request.
    assert await served.call("two", anthropic_messages, session_id="two") == "modify"
    assert outcomes(await served.metrics()) == {"error": 1}
    assert "KeyError" in caplog.text and SECRET_TEXT not in caplog.text


# -- the flags -------------------------------------------------------------------------------


def test_hash_users_takes_a_key_file_of_some_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_text("0123456789abcdef-and-more\n")
    settings = cli.parse_settings(["--hash-users", "--user-hash-key-file", str(key), "--max-user-labels", "7"], env={})
    assert (settings.user_hash_key, settings.max_user_labels) == (b"0123456789abcdef-and-more", 7)
    assert "0123456789abcdef" not in repr(settings)
    for argv in (["--hash-users"], ["--user-hash-key-file", str(key)]):
        with pytest.raises(SystemExit):
            cli.parse_settings(argv, env={})
        assert "go together" in capsys.readouterr().err
    key.write_text("short")
    with pytest.raises(SystemExit):
        cli.parse_settings(["--hash-users", "--user-hash-key-file", str(key)], env={})
    assert "too short" in capsys.readouterr().err
    env = {"HOOKD_HASH_USERS": "1", "HOOKD_USER_HASH_KEY_FILE": str(tmp_path / "missing")}
    with pytest.raises(SystemExit):
        cli.parse_settings([], env=env)
    assert "cannot read" in capsys.readouterr().err
