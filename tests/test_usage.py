"""Reading the provider's bill out of an event in every shape it comes in, and the estimate of
the bill without hookd built from it."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hookd import usage
from hookd.estimator import without_hookd
from hookd.ledger import Facts
from hookd.prices import DEFAULT_TABLE, Usage


def read_usage(document: dict[str, Any]) -> tuple[Usage | None, str]:
    event = usage.read(document)
    assert event is not None
    return event.usage, event.source


def test_anthropic_without_the_lifetime_split_counts_every_write_as_five_minutes() -> None:
    body = {"usage": {"input_tokens": 7, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 30}}
    assert read_usage({"response_body": body}) == (Usage(input=7, cache_read=100, cache_write=30), "response_body")


def test_anthropic_one_hour_writes_are_counted_apart() -> None:
    split = {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20}
    body = {"usage": {"input_tokens": 1, "cache_creation_input_tokens": 30, "cache_creation": split}}
    assert read_usage({"response_body": body})[0] == Usage(input=1, cache_write=10, cache_write_long=20)


def test_a_streams_later_events_replace_its_earlier_counts() -> None:
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 50}}}
    # Newer API versions repeat the input counts, cumulative, in message_delta.
    delta = {"type": "message_delta", "usage": {"output_tokens": 9, "input_tokens": 6, "cache_read_input_tokens": 50}}
    assert read_usage({"raw_responses": [start, {"type": "ping"}, delta]}) == (
        Usage(input=6, cache_read=50),
        "raw_responses",
    )


def test_sse_events_kept_with_their_names_are_read_too() -> None:
    wrapped = {"event": "message_start", "data": {"message": {"usage": {"input_tokens": 3}}}}
    assert read_usage({"raw_responses": [wrapped]})[0] == Usage(input=3)


def test_a_long_stream_is_read_at_its_ends() -> None:
    deltas = [{"type": "content_block_delta", "delta": {"text": "x"}}] * 100_000
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 4, "cache_read_input_tokens": 40}}}
    assert read_usage({"raw_responses": [start, *deltas, {"usage": {"output_tokens": 1}}]})[0] == Usage(4, 40)


def test_openai_responses_api_and_gemini_count_cached_tokens_inside_the_total() -> None:
    responses = {"usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 64}, "output_tokens": 3}}
    assert read_usage({"response_body": responses})[0] == Usage(input=36, cache_read=64)
    gemini = {"usageMetadata": {"promptTokenCount": 100, "cachedContentTokenCount": 80}}
    assert read_usage({"response_body": gemini})[0] == Usage(input=20, cache_read=80)
    deepseek = {"usage": {"prompt_tokens": 90, "prompt_cache_hit_tokens": 70, "prompt_cache_miss_tokens": 20}}
    assert read_usage({"response_body": deepseek})[0] == Usage(input=20, cache_read=70)
    completed = {"type": "response.completed", "response": responses}
    assert read_usage({"raw_responses": [completed]})[0] == Usage(input=36, cache_read=64)


def test_apertures_estimate_is_read_as_disjoint_counts() -> None:
    cost = {
        "dollars": 0.5,
        "usage": {
            "input_tokens": 10,
            "cached_tokens": 200,
            "cache_creation_input_tokens": 50,
            "cache_creation_1h_input_tokens": 50,
        },
    }
    event = usage.read({"metadata": {"estimated_cost": cost, "request_id": "r", "login_name": "a@b"}})
    assert event is not None
    assert (event.usage, event.source, event.dollars) == (
        Usage(input=10, cache_read=200, cache_write_long=50),
        "estimated_cost",
        0.5,
    )
    assert (event.request_id, event.user) == ("r", "a@b")


def test_a_malformed_native_usage_falls_back_to_apertures() -> None:
    document = {
        "response_body": {"usage": {"input_tokens": "many"}},
        "metadata": {"estimated_cost": {"usage": {"input_tokens": 8}}},
    }
    assert read_usage(document) == (Usage(input=8), "estimated_cost")


COUNTS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
USAGE_KEYS = st.sampled_from(
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "prompt_tokens",
        "cached_tokens",
        "cache_creation",
        "prompt_tokens_details",
        "input_tokens_details",
        "ephemeral_1h_input_tokens",
        "gemini",
    ]
)
USAGES = st.recursive(
    st.dictionaries(USAGE_KEYS, COUNTS, max_size=4),
    lambda inner: st.dictionaries(USAGE_KEYS, inner, max_size=3),
    max_leaves=6,
)
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries(
            {}, optional={"request_id": COUNTS, "estimated_cost": st.fixed_dictionaries({"usage": USAGES})}
        ),
        "response_body": st.fixed_dictionaries({"usage": USAGES}) | COUNTS,
        "raw_responses": st.lists(st.fixed_dictionaries({"usage": USAGES}) | COUNTS, max_size=4) | COUNTS,
    },
)


# No deadline: a busy machine is slow, not wrong.
@settings(deadline=None)
@given(DOCUMENTS)
def test_any_document_reads_as_token_counts_or_none(document: dict[str, Any]) -> None:
    event = usage.read(document)
    assert event is not None
    if event.usage is not None:
        counts = vars(event.usage).values()
        assert all(type(c) is int and 0 <= c <= 4 * usage.MAX_TOKENS for c in counts), event.usage
    assert isinstance(event.request_id, str)


ANTHROPIC = DEFAULT_TABLE["anthropic"]
OPENAI = DEFAULT_TABLE["openai"]


def facts(removed_cached: int = 0, removed_new: int = 0, rewritten: int = 0) -> Facts:
    return Facts("anthropic", "claude", "a", 10_000, 9_000, removed_cached, removed_new, rewritten)


def test_removed_history_would_have_been_read_and_removed_new_content_written() -> None:
    billed = Usage(input=50, cache_read=8_000, cache_write=1_000)
    estimate = without_hookd(billed, facts(removed_cached=600, removed_new=400), ANTHROPIC)
    assert estimate == Usage(input=50, cache_read=8_600, cache_write=1_400)


def test_new_content_goes_where_the_request_wrote_it() -> None:
    billed = Usage(input=50, cache_read=8_000, cache_write_long=1_000)
    assert without_hookd(billed, facts(removed_new=400), ANTHROPIC).cache_write_long == 1_400
    # Nothing written (no breakpoint, or below the provider's minimum): it would have been input.
    assert without_hookd(Usage(input=500), facts(removed_new=400), ANTHROPIC) == Usage(input=900)


def test_rewritten_history_would_have_been_read_instead() -> None:
    billed = Usage(input=50, cache_read=2_000, cache_write=3_000)
    estimate = without_hookd(billed, facts(rewritten=2_500), ANTHROPIC)
    assert estimate == Usage(input=50, cache_read=4_500, cache_write=500)
    # Automatic caches bill it as input; and never below zero.
    estimate = without_hookd(Usage(input=1_000, cache_read=5_000), facts(rewritten=1_200, removed_new=100), OPENAI)
    assert estimate == Usage(input=0, cache_read=6_200)
